"""A device as the on-device scheduler sees it: processing units, and for each model the
latency and energy of one inference (or one training step) on each unit that can run it.

`xr_device()` builds the device the XR simulations use: CPU cores like one of this machine's, where
fedge's own models (keyword spotting, a streaming-ASR chunk, HRViT, a MobileLLM decode step)
and the federated task's training step are measured (one torch thread, cached), and an
XRBench-style accelerator for the models fedge does not have, costed from XRBench's layer
tables (`fedge.edge.xrbench.XRBENCH_GMACS`) at a rate and energy per MAC calibrated on
XRBench's published schedule (`XRbench_evaluation/eval_data/schedule/
schedule_VR_gaming__Single_4K__WS.csv`: ES_RITNet 1.503 ms / 35.33 mJ, GE_FBNet_C 4.222 ms /
34.92 mJ, HT_hand_graph_cnn_half 8.562 ms / 207.43 mJ for 7.016 GMACs: 0.491 GMAC/ms and
39.6 mJ/GMAC on 4K PEs), doubled in rate for an 8K-PE unit (XRBench's Single_8K).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedge.edge.xrbench import XRBENCH_GMACS
from fedge.errors import ConfigError
from fedge.files import cache_dir

TRAIN_STEP = "train_step"  # the cost-table entry of one local-training step

NPU_4K_GMAC_PER_MS = 7.016 / (1.503136 + 4.222037 + 8.561680)
NPU_MJ_PER_GMAC = (35.329716 + 34.922195 + 207.433304) / 7.016
CPU_CORE_WATTS = 2.0  # assumed active power of one core (mJ per ms = W); no meter here


@dataclass(frozen=True)
class Cost:
    """One run of a model on a unit."""

    latency_ms: float
    energy_mj: float

    def __post_init__(self) -> None:
        if not self.latency_ms > 0 or self.energy_mj < 0:
            raise ConfigError(f"a cost needs latency > 0 and energy >= 0, got {self}")


@dataclass
class Device:
    """Processing units in a fixed order and a cost table costs[model][unit]; a model runs
    only on the units its table names."""

    name: str
    units: tuple[str, ...]
    costs: dict[str, dict[str, Cost]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.units or len(set(self.units)) != len(self.units):
            raise ConfigError(f"device {self.name!r} needs distinct units, got {self.units}")
        for model, per_unit in self.costs.items():
            unknown = set(per_unit) - set(self.units)
            if unknown:
                raise ConfigError(f"device {self.name!r}: {model} names unknown units {unknown}")

    def can_run(self, model: str, unit: str) -> bool:
        return unit in self.costs.get(model, {})

    def cost(self, model: str, unit: str) -> Cost:
        try:
            return self.costs[model][unit]
        except KeyError:
            raise ConfigError(f"device {self.name!r} cannot run {model!r} on {unit!r}") from None

    def fastest(self, model: str, units: tuple[str, ...] | list[str]) -> str | None:
        """The unit among `units` with the lowest latency for `model` (None: none can)."""
        able = [u for u in units if self.can_run(model, u)]
        return min(able, key=lambda u: self.costs[model][u].latency_ms) if able else None

    def check_runs(self, models: list[str]) -> None:
        """A one-line error if the device has no unit for one of `models`."""
        missing = [m for m in models if not self.costs.get(m)]
        if missing:
            raise ConfigError(f"device {self.name!r} has no unit that runs {missing}")


# --- measurement ---------------------------------------------------------------------------
def measure_ms(
    workloads: dict[str, Callable[[], object]], repeats: int = 50, warmup: int = 3
) -> dict[str, float]:
    """Fastest wall time in ms of each workload over `repeats` rounds, one torch thread:
    what one core gives when nothing else runs. Rounds interleave the workloads, so a burst
    of the shared machine's other load hits them all alike and the minimum skips it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = dict.fromkeys(workloads, float("inf"))
    try:
        for fn in workloads.values():
            for _ in range(warmup):
                fn()
        for _ in range(repeats):
            for name, fn in workloads.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], (time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(threads)
    return best


def _fedge_workloads() -> dict[str, Callable[[], object]]:
    """One inference of each fedge model fedge's scenarios use, on its tiny config."""
    from fedge.tasks.asr.model import ASRConfig, StreamingASR
    from fedge.tasks.hrvit.model import build_model as build_hrvit
    from fedge.tasks.mobilellm.model import build_model as build_llm

    torch.manual_seed(0)
    kws = StreamingASR(ASRConfig(n_out=10, head="pool")).eval()
    asr = StreamingASR(ASRConfig()).eval()
    hrvit = build_hrvit("tiny").eval()
    llm = build_llm("tiny").eval()
    llm.setup_caches(1, 64)
    clip = torch.randn(1, 100, 40)  # 1 s of 10 ms log-mel frames
    chunk = torch.randn(1, 16, 40)  # one 160 ms streaming chunk
    image = torch.randn(1, 3, 64, 64)
    token, pos = torch.tensor([[65]]), torch.tensor([8])

    @torch.no_grad()
    def run(model: torch.nn.Module, *args: torch.Tensor) -> object:
        return model(*args)

    return {
        "kws": lambda: run(kws, clip),
        "asr_chunk": lambda: asr.stream_step(chunk),
        "hrvit": lambda: run(hrvit, image),
        "llm_decode": lambda: llm(token, pos),
    }


def train_step_workload(task_name: str, batch_size: int) -> Callable[[], object]:
    """One local SGD step of a fedge task on a batch of its training data."""
    from fedge.tasks import build_task

    task = build_task(task_name, seed=0)
    model = task.build_model()
    data = task.train_dataset()
    batch = next(iter(task.loader(data, batch_size, shuffle=False)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> object:
        opt.zero_grad()
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        return loss

    return step


def default_cache() -> Path:
    """Where measured latencies are kept between runs (fedge's cache folder)."""
    return cache_dir("edge.json")


@dataclass(frozen=True)
class Measurement:
    """Latencies (ms) measured on one machine, and how loaded it was then."""

    latency_ms: dict[str, float]
    loadavg_1min: float
    when: str


def measured_latencies(
    task_name: str = "digits", batch_size: int = 32, cache: Path | None = None
) -> Measurement:
    """Latency (ms, one thread) of fedge's scenario models and one training step of
    `task_name`, measured once per machine, torch version and task, then read from `cache`."""
    cache = cache or default_cache()
    key = f"v2|{platform.node()}|{torch.__version__}|{task_name}|{batch_size}"
    stored: dict[str, dict] = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in stored:
        workloads = _fedge_workloads()
        workloads[TRAIN_STEP] = train_step_workload(task_name, batch_size)
        stored[key] = {
            "latency_ms": measure_ms(workloads),
            "loadavg_1min": os.getloadavg()[0],
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(stored, indent=1, sort_keys=True))
    return Measurement(**stored[key])


def xr_device(cpu_ms: dict[str, float], cpu_cores: int = 2, npu_pes: int = 8192) -> Device:
    """`cpu_cores` CPU cores (fedge's models and training, at the measured `cpu_ms`) and
    one XRBench-style accelerator with `npu_pes` PEs (XRBench's models, inference only)."""
    if cpu_cores < 1 or npu_pes < 1:
        raise ConfigError(f"need at least one core and one PE, got {cpu_cores}, {npu_pes}")
    rate = NPU_4K_GMAC_PER_MS * npu_pes / 4096
    costs: dict[str, dict[str, Cost]] = {
        m: {"npu": Cost(g / rate, g * NPU_MJ_PER_GMAC)} for m, g in XRBENCH_GMACS.items()
    }
    cores = tuple(f"cpu{i}" for i in range(cpu_cores))
    for model, ms in cpu_ms.items():
        costs[model] = {c: Cost(ms, ms * CPU_CORE_WATTS) for c in cores}
    return Device(f"xr-cpu{cpu_cores}-npu{npu_pes // 1024}k", (*cores, "npu"), costs)
