"""The on-device scheduler interface, and the three baselines: FCFS, earliest deadline
first, and XRBench's latency-greedy runtime.

A scheduler is asked at every event (a frame arrives, a unit finishes, a deadline passes)
which ready jobs go to which idle units, and whether a local-training step may take an idle
unit. The engine (`fedge.edge.cosched`) hands it only jobs whose dependencies are done and
checks every answer, so no scheduler can start a job early or twice. Plug in your own as
`package.module:Class` (a `Scheduler` subclass), like strategies.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from fedge.edge.device import Cost, Device
from fedge.edge.xrbench import FrameRecord, ModelSpec, Scenario
from fedge.errors import ConfigError
from fedge.plugins import load_object

EPS_MS = 1e-9


@dataclass(eq=False)
class Job:
    """A requested frame of one model, waiting or ready; its record fills in as it runs."""

    spec: ModelSpec
    record: FrameRecord

    @property
    def model(self) -> str:
        return self.spec.name

    @property
    def deadline_ms(self) -> float:
        return self.record.deadline_ms

    @property
    def injected_ms(self) -> float:
        return self.record.injected_ms


@dataclass
class DeviceState:
    """What a scheduler may look at: the clock, the device, when busy units free up, and
    every requested job not yet started (ready or waiting on a dependency)."""

    now: float
    device: Device
    scenario: Scenario
    busy_until: dict[str, float]
    pending: list[Job]

    def next_release(self, spec: ModelSpec) -> float:
        """When the model's next frame arrives after now. The scenario goes on past the
        simulated horizon, so a release after it still counts."""
        return (math.floor(self.now / spec.period_ms + EPS_MS) + 1) * spec.period_ms


class Scheduler(ABC):
    """Maps ready jobs to idle units; decides whether training may take an idle unit."""

    name: str = ""
    scenario: Scenario
    device: Device

    def reset(self, scenario: Scenario, device: Device) -> None:
        """Called before a run; schedulers that learn online start over here."""
        self.scenario, self.device = scenario, device

    @abstractmethod
    def assign(
        self, ready: Sequence[Job], idle: Sequence[str], state: DeviceState
    ) -> list[tuple[Job, str]]:
        """Pairs (job, unit) to start now; each job and unit at most once."""

    def admit_training(
        self, unit: str, step: Cost, ready_left: Sequence[Job], state: DeviceState
    ) -> bool:
        """Whether one training step may start on idle `unit` now. The baselines train in
        any idle time: only when no ready job could use the unit (background priority)."""
        return not any(self.device.can_run(j.model, unit) for j in ready_left)

    def observe(self, record: FrameRecord) -> None:  # noqa: B027 (optional hook)
        """A frame finished or was dropped (online feedback; the baselines ignore it)."""


def _place(
    order: Sequence[Job], idle: Sequence[str], device: Device, fastest: bool
) -> list[tuple[Job, str]]:
    """Walk jobs in `order`, giving each the first (or fastest) idle unit that runs it."""
    free, out = list(idle), []
    for job in order:
        able = [u for u in free if device.can_run(job.model, u)]
        if not able:
            continue
        unit = min(able, key=lambda u: device.cost(job.model, u).latency_ms) if fastest else able[0]
        free.remove(unit)
        out.append((job, unit))
    return out


class FCFS(Scheduler):
    """First come, first served: jobs in arrival order, each on the first idle unit."""

    name = "fcfs"

    def assign(
        self, ready: Sequence[Job], idle: Sequence[str], state: DeviceState
    ) -> list[tuple[Job, str]]:
        order = {m.name: i for i, m in enumerate(self.scenario.models)}
        jobs = sorted(ready, key=lambda j: (j.injected_ms, order[j.model], j.record.frame))
        return _place(jobs, idle, self.device, fastest=False)


class EDF(Scheduler):
    """Earliest deadline first, each job on the fastest idle unit that runs it."""

    name = "edf"

    def assign(
        self, ready: Sequence[Job], idle: Sequence[str], state: DeviceState
    ) -> list[tuple[Job, str]]:
        jobs = sorted(ready, key=lambda j: (j.deadline_ms, j.injected_ms, j.model))
        return _place(jobs, idle, self.device, fastest=True)


class LatencyGreedy(Scheduler):
    """XRBench's runtime (`HET_runtime.hpp` DispatchJobs, LatencyGreedy): models visited in
    name order (its std::map), each model's oldest request on the idle unit with the lowest
    latency for it, repeated until nothing more can start."""

    name = "latency-greedy"

    def assign(
        self, ready: Sequence[Job], idle: Sequence[str], state: DeviceState
    ) -> list[tuple[Job, str]]:
        queues: dict[str, list[Job]] = {}
        for job in sorted(ready, key=lambda j: j.record.frame):
            queues.setdefault(job.model, []).append(job)
        free, out, changed = list(idle), [], True
        while changed and free:
            changed = False
            for model in sorted(queues):
                if not queues[model] or not free:
                    continue
                unit = self.device.fastest(model, free)
                if unit is None:
                    continue
                out.append((queues[model].pop(0), unit))
                free.remove(unit)
                changed = True
        return out


SCHEDULERS: dict[str, str] = {
    "fcfs": "fedge.edge.scheduler:FCFS",
    "edf": "fedge.edge.scheduler:EDF",
    "latency-greedy": "fedge.edge.scheduler:LatencyGreedy",
    "dream": "fedge.edge.dream:Dream",
}


def load_scheduler(spec: str) -> Scheduler:
    """A scheduler by name (fcfs, edf, latency-greedy, dream) or `package.module:Class`."""
    if spec in SCHEDULERS:
        spec = SCHEDULERS[spec]
    elif ":" not in spec:
        raise ConfigError(
            f"unknown scheduler {spec!r}; choose one of {sorted(SCHEDULERS)} "
            "or give 'package.module:Class'"
        )
    cls = load_object(spec)
    if not (isinstance(cls, type) and issubclass(cls, Scheduler)):
        raise ConfigError(f"{spec!r} is not a fedge.edge.scheduler.Scheduler subclass")
    return cls()
