"""XRBench-style real-time multi-model scenarios and XRBench's scoring.

Kwon et al., "XRBench: An Extended Reality (XR) Machine Learning Benchmark Suite for the
Metaverse" (MLSys 2023); code under MIT at github.com/XRBench/XRBench-MLSys2023. What is
taken from that code (read, not copied):

- scenarios: `XRbench_evaluation/usage_scenarios/*.m` (models, FPS, `Probability`,
  `Dependency`); the GMACs below are summed from those files' CONV layer tables
  (N*K*C*(Y-R+1)*(X-S+1)*R*S, stride 1);
- frames: frame i of a model is injected at i*T and due at (i+1)*T, T = 1000/FPS ms
  (`HET_load-generator.hpp` computes both from the last dispatched id d = i - 1:
  injection interval * (d + 1), deadline interval * (d + 2)); a model with probability p
  is requested on a frame with probability p;
- drops (`HET_runtime.hpp` DropLateFrames): a queued request whose deadline has passed is
  dropped, and so is every queued request of a model that waits on it (XRBench does one
  level; fedge follows chains to any depth);
- scores (`HET_scoring-module.hpp`, parameters in `XRBench-MAESTRO.cpp`: k = 15, E_max =
  1500, time in ms, energy in mJ): real-time 1/(1+e^{k(finish-deadline)}), energy
  (E_max-E)/E_max, QoE 1 - drop rate; a model's score is the sum of RT x energy over its
  finished frames divided by all its requested frames, times its QoE; the scenario score is
  the mean over models, x 100.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedge.errors import ConfigError

K_REALTIME = 15.0  # per ms, XRBench v0.1 default
E_MAX_MJ = 1500.0  # XRBench v0.1 default


@dataclass(frozen=True)
class ModelSpec:
    """One model of a scenario: its frame rate, the model whose output it waits on (if any),
    and the probability that a frame triggers it."""

    name: str
    fps: float
    depends_on: str | None = None
    probability: float = 1.0

    @property
    def period_ms(self) -> float:
        return 1000.0 / self.fps


@dataclass(frozen=True)
class Scenario:
    """A named set of models running concurrently; checked on construction."""

    name: str
    models: tuple[ModelSpec, ...]

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        if not names:
            raise ConfigError(f"scenario {self.name!r} has no models")
        if len(set(names)) != len(names):
            raise ConfigError(f"scenario {self.name!r} names a model twice: {names}")
        for m in self.models:
            if not m.fps > 0:
                raise ConfigError(f"scenario {self.name!r}: {m.name} has fps {m.fps}; must be > 0")
            if not 0.0 <= m.probability <= 1.0:
                raise ConfigError(
                    f"scenario {self.name!r}: {m.name} has probability {m.probability}; "
                    "must be in [0, 1]"
                )
            if m.depends_on is not None and m.depends_on not in names:
                raise ConfigError(
                    f"scenario {self.name!r}: {m.name} depends on unknown model {m.depends_on!r}"
                )
        for m in self.models:  # a dependency chain must end
            seen, cur = {m.name}, m.depends_on
            while cur is not None:
                if cur in seen:
                    raise ConfigError(f"scenario {self.name!r}: dependency cycle through {cur!r}")
                seen.add(cur)
                cur = self.model(cur).depends_on

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"scenario {self.name!r} has no model {name!r}")

    def dependents(self, name: str) -> list[str]:
        """Models that wait, directly or through others, on `name`'s output."""
        out: list[str] = []
        frontier = [name]
        while frontier:
            cur = frontier.pop()
            for m in self.models:
                if m.depends_on == cur:
                    out.append(m.name)
                    frontier.append(m.name)
        return out


# GMACs per frame, summed from XRBench's usage_scenarios/*.m layer tables.
XRBENCH_GMACS: dict[str, float] = {
    "KD_res8_narrow": 0.0053,
    "ASR_EM_24L": 9.6637,
    "SS_HRViT_b1": 20.0952,
    "DE_midas_v21_small": 18.4936,
    "PD_Plane_RCNN_Quarter": 7.5240,
    "OD_D2go_FasterRCNN": 9.7073,
    "HT_hand_graph_cnn_half": 3.7262,
    "ES_RITNet": 1.0401,
    "GE_FBNet_C": 2.2497,
    "DR_RGBd_200": 16.8372,
    "AS_ED_TCN": 0.3545,
}


def _m(name: str, fps: float, depends_on: str | None = None, p: float = 1.0) -> ModelSpec:
    return ModelSpec(name, fps, depends_on, p)


# XRBench's usage scenarios, as in its usage_scenarios/*.m files (Outdoor B's D2go_FastRCNN
# has the same layer table as OD_D2go_FasterRCNN and is named so here).
XRBENCH_SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "ar_assistant",
            (
                _m("KD_res8_narrow", 3),
                _m("ASR_EM_24L", 3, "KD_res8_narrow", 0.5),
                _m("SS_HRViT_b1", 10),
                _m("DE_midas_v21_small", 30),
                _m("PD_Plane_RCNN_Quarter", 15),
                _m("OD_D2go_FasterRCNN", 10),
            ),
        ),
        Scenario(
            "ar_gaming",
            (
                _m("HT_hand_graph_cnn_half", 45),
                _m("DE_midas_v21_small", 30),
                _m("PD_Plane_RCNN_Quarter", 15),
            ),
        ),
        Scenario(
            "vr_gaming",
            (
                _m("ES_RITNet", 60),
                _m("GE_FBNet_C", 60, "ES_RITNet", 1.0),
                _m("HT_hand_graph_cnn_half", 45),
            ),
        ),
        Scenario(
            "outdoor_a",
            (
                _m("KD_res8_narrow", 3),
                _m("ASR_EM_24L", 3, "KD_res8_narrow", 0.2),
                _m("SS_HRViT_b1", 10),
                _m("OD_D2go_FasterRCNN", 30),
            ),
        ),
        Scenario(
            "outdoor_b",
            (
                _m("KD_res8_narrow", 3),
                _m("ASR_EM_24L", 3, "KD_res8_narrow", 0.2),
                _m("OD_D2go_FasterRCNN", 30),
            ),
        ),
        Scenario(
            "social_a",
            (
                _m("ES_RITNet", 60),
                _m("GE_FBNet_C", 60, "ES_RITNet"),
                _m("DR_RGBd_200", 30),
                _m("HT_hand_graph_cnn_half", 30),
            ),
        ),
        Scenario(
            "social_b",
            (
                _m("ES_RITNet", 60),
                _m("GE_FBNet_C", 60, "ES_RITNet"),
                _m("AS_ED_TCN", 30),
            ),
        ),
    )
}

# Where fedge has a model of its own, a scenario runs it instead of XRBench's layer table:
# keyword spotting and the streaming-ASR chunk (fedge.tasks.asr), HRViT (fedge.tasks.hrvit)
# and a MobileLLM decode step (fedge.tasks.mobilellm). Their latency is measured here.
FEDGE_MODELS: dict[str, str] = {
    "KD_res8_narrow": "kws",
    "ASR_EM_24L": "asr_chunk",
    "SS_HRViT_b1": "hrvit",
}


def with_fedge_models(scenario: Scenario, llm_fps: float = 0.0) -> Scenario:
    """The scenario with fedge's own models in place of XRBench's where fedge has one; with
    `llm_fps`, a MobileLLM decode step that waits on the ASR output is added (fedge's)."""
    models = []
    for m in scenario.models:
        dep = FEDGE_MODELS.get(m.depends_on, m.depends_on) if m.depends_on else None
        models.append(ModelSpec(FEDGE_MODELS.get(m.name, m.name), m.fps, dep, m.probability))
    if llm_fps:
        if not any(m.name == "asr_chunk" for m in models):
            raise ConfigError(f"scenario {scenario.name!r} has no ASR for the LLM to wait on")
        models.append(ModelSpec("llm_decode", llm_fps, "asr_chunk", 1.0))
    return Scenario(f"{scenario.name}+fedge", tuple(models))


def scenario(name: str) -> Scenario:
    """An XRBench scenario by name; an unknown name is a one-line error listing them."""
    try:
        return XRBENCH_SCENARIOS[name]
    except KeyError:
        raise ConfigError(
            f"unknown scenario {name!r}; choose one of {sorted(XRBENCH_SCENARIOS)}"
        ) from None


# --- scoring -------------------------------------------------------------------------------
@dataclass
class FrameRecord:
    """What happened to one requested frame of one model (times in ms, energy in mJ)."""

    model: str
    frame: int
    injected_ms: float
    deadline_ms: float
    start_ms: float | None = None
    finish_ms: float | None = None
    unit: str | None = None
    energy_mj: float = 0.0
    dropped: bool = False
    dropped_ms: float | None = None  # when it was dropped (XRBench logs that time too)

    @property
    def late(self) -> bool:
        """Finished after its deadline (it still counts for QoE, as in XRBench)."""
        return self.finish_ms is not None and self.finish_ms > self.deadline_ms


def realtime_score(finish_ms: float, deadline_ms: float, k: float = K_REALTIME) -> float:
    """XRBench's real-time score 1/(1+e^{k(finish-deadline)}): 0.5 exactly at the deadline."""
    x = k * (finish_ms - deadline_ms)
    if x > 700.0:  # e^x overflows a float; the score is 0 to double precision
        return 0.0
    return 1.0 / (1.0 + math.exp(x))


def energy_score(energy_mj: float, e_max_mj: float = E_MAX_MJ) -> float:
    """XRBench's energy score (E_max - E) / E_max."""
    return (e_max_mj - energy_mj) / e_max_mj


def qoe_score(records: Sequence[FrameRecord]) -> float:
    """XRBench's QoE (user-experience) score: 1 - frame-drop rate."""
    if not records:
        return 0.0
    return 1.0 - sum(r.dropped for r in records) / len(records)


def model_score(
    records: Sequence[FrameRecord], k: float = K_REALTIME, e_max_mj: float = E_MAX_MJ
) -> float:
    """One model's score: sum of RT x energy over finished frames / requested frames x QoE."""
    if not records:
        return 0.0
    total = sum(
        realtime_score(r.finish_ms, r.deadline_ms, k) * energy_score(r.energy_mj, e_max_mj)
        for r in records
        if not r.dropped and r.finish_ms is not None
    )
    return total / len(records) * qoe_score(records)


def by_model(records: Iterable[FrameRecord]) -> dict[str, list[FrameRecord]]:
    out: dict[str, list[FrameRecord]] = {}
    for r in records:
        out.setdefault(r.model, []).append(r)
    return out


def scenario_score(
    records: Iterable[FrameRecord], k: float = K_REALTIME, e_max_mj: float = E_MAX_MJ
) -> float:
    """XRBench's scenario score: mean of the model scores x 100 (models with requests)."""
    groups = by_model(records)
    if not groups:
        return 0.0
    return 100.0 * sum(model_score(g, k, e_max_mj) for g in groups.values()) / len(groups)


def deadline_violation_rate(records: Sequence[FrameRecord]) -> float:
    """Frames dropped or finished late, over frames requested."""
    if not records:
        return 0.0
    return sum(r.dropped or r.late for r in records) / len(records)


def uxcost(records: Sequence[FrameRecord], energy_mj: float, reference_energy_mj: float) -> float:
    """DREAM's UXCost as fedge computes it: deadline-violation rate x energy normalised to a
    reference run's energy (an EDP-like product; see docs/results/xr.md for the source)."""
    if reference_energy_mj <= 0:
        raise ConfigError("reference energy must be > 0")
    return deadline_violation_rate(records) * (energy_mj / reference_energy_mj)
