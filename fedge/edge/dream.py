"""A DREAM-like dynamic, score-based scheduler (after Kim et al., "DREAM: A Dynamic Scheduler
for Dynamic Real-time Multi-model ML Workloads", ASPLOS 2023).

What is DREAM's, at the level its abstract and overview state it: every scheduling decision
scores each (job, unit) candidate from the job's urgency and the current system load, and the
score's tunable parameters adapt online to what the workload does. What is fedge's own (the
paper's exact score terms and update rules are not reproduced here):

    score(job, unit) = w_urgency * urgency + w_energy * (1 - E(job, unit) / E_ref)
                       - w_load * load(unit)
    urgency = 1                                   if the job would finish late even now
            = exp(-slack / tau) + 0.5 * #dependents  otherwise (tau = 10 ms),
    slack = deadline - now - latency (least laxity first, plus what finishing unlocks)

`load(unit)` is the unit's utilisation by the scenario (sum of latency / period of the models
it is fastest for). Training steps are jobs too: one is admitted on an idle unit only if,
after it, the frames that may need the unit next (waiting jobs, each model's next release),
run in deadline order, all still finish with a fraction theta of their slack to spare.
Online, a late or dropped frame raises theta and w_urgency; an on-time frame lets them decay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from fedge.edge.device import Cost, Device
from fedge.edge.scheduler import DeviceState, Job, Scheduler
from fedge.edge.xrbench import FrameRecord, Scenario


class Dream(Scheduler):
    """DREAM-like: urgency/energy/load scores and an online-adapted training margin."""

    name = "dream"

    def __init__(
        self,
        w_urgency: float = 1.0,
        w_energy: float = 0.2,
        w_load: float = 0.2,
        theta: float = 0.5,
        theta_min: float = 0.2,
        theta_max: float = 1.0,
        tau_ms: float = 10.0,
    ) -> None:
        self.params = (w_urgency, w_energy, w_load, theta, theta_min, theta_max)
        self.tau_ms = tau_ms
        self.theta_min, self.theta_max = theta_min, theta_max

    def reset(self, scenario: Scenario, device: Device) -> None:
        super().reset(scenario, device)
        self.w_urgency, self.w_energy, self.w_load, self.theta = self.params[:4]
        self.dependents = {m.name: len(scenario.dependents(m.name)) for m in scenario.models}
        self.load: dict[str, float] = dict.fromkeys(device.units, 0.0)
        for m in scenario.models:
            unit = device.fastest(m.name, device.units)
            if unit is not None:
                self.load[unit] += device.cost(m.name, unit).latency_ms / m.period_ms
        energies = [c.energy_mj for per in device.costs.values() for c in per.values()]
        self.e_ref = max(energies) if energies else 1.0

    def score(self, job: Job, unit: str, now: float) -> float:
        cost = self.device.cost(job.model, unit)
        slack = job.deadline_ms - now - cost.latency_ms
        if slack < 0:
            urgency = 1.0
        else:
            urgency = math.exp(-slack / self.tau_ms) + 0.5 * self.dependents[job.model]
        energy = 1.0 - cost.energy_mj / self.e_ref if self.e_ref > 0 else 1.0
        return self.w_urgency * urgency + self.w_energy * energy - self.w_load * self.load[unit]

    def assign(
        self, ready: Sequence[Job], idle: Sequence[str], state: DeviceState
    ) -> list[tuple[Job, str]]:
        pairs = [
            (self.score(job, unit, state.now), i, job, unit)
            for i, job in enumerate(ready)
            for unit in idle
            if self.device.can_run(job.model, unit)
        ]
        pairs.sort(key=lambda p: (-p[0], p[1]))
        used_jobs: set[int] = set()
        used_units: set[str] = set()
        out = []
        for _, i, job, unit in pairs:
            if i in used_jobs or unit in used_units:
                continue
            used_jobs.add(i)
            used_units.add(unit)
            out.append((job, unit))
        return out

    def admit_training(
        self, unit: str, step: Cost, ready_left: Sequence[Job], state: DeviceState
    ) -> bool:
        if any(self.device.can_run(j.model, unit) for j in ready_left):
            return False
        # The frames that may need this unit next: jobs waiting on a dependency (any moment)
        # and each model's next release; run after the step in deadline order, each must
        # still finish with theta of its slack to spare.
        demand = [
            (state.now, job.deadline_ms, job.spec.period_ms, job.model)
            for job in state.pending
            if self.device.can_run(job.model, unit)
        ]
        for m in self.scenario.models:
            if self.device.can_run(m.name, unit):
                release = state.next_release(m)
                demand.append((release, release + m.period_ms, m.period_ms, m.name))
        t = state.now + step.latency_ms
        for release, deadline, period, model in sorted(demand, key=lambda d: d[1]):
            lat = self.device.cost(model, unit).latency_ms
            t = max(t, release) + lat
            if t > deadline - self.theta * max(period - lat, 0.0):
                return False
        return True

    def observe(self, record: FrameRecord) -> None:
        if record.dropped or record.late:
            self.theta = min(self.theta_max, self.theta * 1.5 + 0.05)
            self.w_urgency = min(4.0, self.w_urgency * 1.25)
        else:
            self.theta = max(self.theta_min, self.theta * 0.995)
            self.w_urgency = max(self.params[0], self.w_urgency * 0.995)
