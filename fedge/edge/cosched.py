"""Co-scheduling: a scenario's frames and a client's local training on one device, as a
discrete-event simulation; the training steps a scheduler lets through in a window of device
time are that device's round budget (`fedge.simulation.scheduled`).

Units run one job at a time without preemption (XRBench's model). Training is a stream of
steps (one at a time, each with its own cost on each unit that can train):
- "off": inference only;
- "always": training that ignores the scenario: it holds a unit, starting its next step the
  moment the last one ends, ahead of any waiting frame;
- "slack": the scheduler places steps into idle units only when it admits them
  (`Scheduler.admit_training`).
Frames arrive until the horizon; the run ends when every frame has finished or been dropped,
so an infeasible scenario reports its misses instead of running on.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from fedge.edge.device import TRAIN_STEP, Device
from fedge.edge.scheduler import EPS_MS, DeviceState, Job, Scheduler
from fedge.edge.xrbench import (
    FrameRecord,
    ModelSpec,
    Scenario,
    deadline_violation_rate,
    scenario_score,
    uxcost,
)
from fedge.errors import ConfigError

TRAINING_MODES = ("off", "always", "slack")


@dataclass
class RunResult:
    """Every frame's record and what training got, for one scenario run."""

    scenario: str
    scheduler: str
    training: str
    horizon_ms: float
    records: list[FrameRecord]
    train_steps: int = 0
    train_energy_mj: float = 0.0
    timeline: list[tuple[str, str, float, float]] = field(default_factory=list)

    @property
    def score(self) -> float:
        return scenario_score(self.records)

    @property
    def drops(self) -> int:
        return sum(r.dropped for r in self.records)

    @property
    def misses(self) -> int:
        """Frames dropped or finished after their deadline."""
        return sum(r.dropped or r.late for r in self.records)

    @property
    def violation_rate(self) -> float:
        return deadline_violation_rate(self.records)

    @property
    def inference_energy_mj(self) -> float:
        return sum(r.energy_mj for r in self.records)

    @property
    def energy_mj(self) -> float:
        return self.inference_energy_mj + self.train_energy_mj

    @property
    def steps_per_s(self) -> float:
        return self.train_steps / (self.horizon_ms / 1000.0)

    def uxcost(self, reference_energy_mj: float) -> float:
        return uxcost(self.records, self.energy_mj, reference_energy_mj)


def requests(scenario: Scenario, horizon_ms: float, seed: int) -> list[Job]:
    """Every requested frame before the horizon, in arrival order. A model with probability
    p is requested on a frame with probability p, and only if the frame it waits on was."""
    requested: dict[str, set[int]] = {}
    jobs: list[Job] = []
    done: set[str] = set()
    order = {m.name: i for i, m in enumerate(scenario.models)}
    while len(done) < len(scenario.models):  # dependencies before dependents
        for m in scenario.models:
            if m.name in done or (m.depends_on and m.depends_on not in done):
                continue
            rng = random.Random(f"{seed}/{m.name}")
            frames = set()
            for i in range(math.floor(horizon_ms / m.period_ms + EPS_MS)):
                t = i * m.period_ms
                if (
                    m.depends_on
                    and dep_frame(scenario.model(m.depends_on), t) not in requested[m.depends_on]
                ):
                    continue
                if m.probability >= 1.0 or rng.random() < m.probability:
                    frames.add(i)
                    record = FrameRecord(m.name, i, t, t + m.period_ms)
                    jobs.append(Job(m, record))
            requested[m.name] = frames
            done.add(m.name)
    jobs.sort(key=lambda j: (j.injected_ms, order[j.model]))
    return jobs


def dep_frame(dependency: ModelSpec, t: float) -> int:
    """The dependency's frame a request injected at t waits on: its latest one by then."""
    return math.floor(t / dependency.period_ms + EPS_MS)


def run(
    scenario: Scenario,
    device: Device,
    scheduler: Scheduler,
    horizon_ms: float = 2000.0,
    training: str = "off",
    seed: int = 0,
) -> RunResult:
    """Simulate the scenario on the device under `scheduler` with `training`."""
    if training not in TRAINING_MODES:
        raise ConfigError(f"training mode {training!r} is not one of {TRAINING_MODES}")
    if not horizon_ms > 0:
        raise ConfigError(f"horizon must be > 0 ms, got {horizon_ms}")
    device.check_runs([m.name for m in scenario.models])
    if training != "off":
        device.check_runs([TRAIN_STEP])
    scheduler.reset(scenario, device)
    arrivals = requests(scenario, horizon_ms, seed)
    result = RunResult(scenario.name, scheduler.name, training, horizon_ms, [])
    pending: list[Job] = []
    running: dict[str, tuple[Job | None, float]] = {}
    completed: dict[str, set[int]] = {m.name: set() for m in scenario.models}
    dropped: dict[str, set[int]] = {m.name: set() for m in scenario.models}
    now, nxt = 0.0, 0

    def ready(job: Job) -> bool:
        dep = job.spec.depends_on
        return dep is None or dep_frame(scenario.model(dep), job.injected_ms) in completed[dep]

    def drop(job: Job) -> None:
        job.record.dropped, job.record.dropped_ms = True, now
        pending.remove(job)
        dropped[job.model].add(job.record.frame)
        result.records.append(job.record)
        scheduler.observe(job.record)

    def start(job: Job | None, unit: str) -> None:
        model = job.model if job else TRAIN_STEP
        cost = device.cost(model, unit)
        running[unit] = (job, now + cost.latency_ms)
        result.timeline.append((unit, model, now, now + cost.latency_ms))
        if job is None:
            result.train_energy_mj += cost.energy_mj
            return
        pending.remove(job)
        job.record.start_ms, job.record.finish_ms = now, now + cost.latency_ms
        job.record.unit, job.record.energy_mj = unit, cost.energy_mj

    def trainer_busy() -> bool:
        return any(job is None for job, _ in running.values())

    def start_training(idle: list[str]) -> str | None:
        unit = device.fastest(TRAIN_STEP, idle)
        if unit is not None:
            start(None, unit)
        return unit

    while True:
        for unit, (job, finish) in list(running.items()):
            if finish <= now + EPS_MS:
                del running[unit]
                if job is None:
                    result.train_steps += 1
                else:
                    completed[job.model].add(job.record.frame)
                    result.records.append(job.record)
                    scheduler.observe(job.record)
        while nxt < len(arrivals) and arrivals[nxt].injected_ms <= now + EPS_MS:
            pending.append(arrivals[nxt])
            nxt += 1
        changed = True
        while changed:  # late frames, then every frame that waits on a dropped one
            changed = False
            for job in list(pending):
                dep = job.spec.depends_on
                lost = dep is not None and (
                    dep_frame(scenario.model(dep), job.injected_ms) in dropped[dep]
                )
                if job.deadline_ms < now - EPS_MS or lost:
                    drop(job)
                    changed = True

        can_train = training != "off" and now < horizon_ms - EPS_MS and not trainer_busy()
        idle = [u for u in device.units if u not in running]
        ready_jobs = [j for j in pending if ready(j)]
        if can_train and training == "always" and start_training(idle):
            can_train = False
            idle = [u for u in device.units if u not in running]
        state = DeviceState(now, device, scenario, {u: f for u, (_, f) in running.items()}, pending)
        chosen = scheduler.assign(ready_jobs, idle, state) if ready_jobs and idle else []
        taken_units: set[str] = set()
        for job, unit in chosen:
            if job not in ready_jobs or job not in pending:
                raise RuntimeError(
                    f"{scheduler.name}: {job.model} frame {job.record.frame} "
                    "is not ready or already started"
                )
            if unit not in idle or unit in taken_units or not device.can_run(job.model, unit):
                raise RuntimeError(
                    f"{scheduler.name}: unit {unit!r} is busy or cannot run {job.model}"
                )
            taken_units.add(unit)
            start(job, unit)
        idle = [u for u in device.units if u not in running]
        if can_train and training == "always":
            start_training(idle)  # a unit only inference could use before
        elif can_train and training == "slack":
            left = [j for j in ready_jobs if j in pending]
            for unit in sorted(
                (u for u in idle if device.can_run(TRAIN_STEP, u)),
                key=lambda u: device.cost(TRAIN_STEP, u).latency_ms,
            ):
                if scheduler.admit_training(unit, device.cost(TRAIN_STEP, unit), left, state):
                    start(None, unit)
                    break

        events = [f for _, f in running.values()]
        if nxt < len(arrivals):
            events.append(arrivals[nxt].injected_ms)
        events += [j.deadline_ms + 2 * EPS_MS for j in pending if j.deadline_ms >= now - EPS_MS]
        events = [t for t in events if t > now + EPS_MS]
        if not events:
            break
        now = min(events)
    result.records.sort(key=lambda r: (r.injected_ms, r.model))
    return result
