"""A per-weight-group energy model for streaming inference, and compression targeted by it.

After "Not all weights are created equal" (arXiv 2402.13076): a weight's energy cost follows
how often it is invoked and which memory it is read from, not just how many weights there are.
Here a weight group is one module that owns parameters (a linear, conv or norm layer). We run
the model in streaming mode over `seconds` of audio with forward hooks and count, per group,
its invocations (each reads the group's weights once) and its multiply-accumulates; attention
scores form a group of their own per layer, with MACs and no weights. Groups are then placed
in on-chip SRAM greedily, most reads per byte first, until it is full; the rest stream from
DRAM on every invocation. Energy per second of audio is

    sum_g  invocations_g * bytes_g * e_tier(g)  +  MACs_g * e_mac

Activation traffic is not modelled. The per-byte and per-MAC costs are 45 nm figures
(Horowitz, ISSCC 2014): 32-bit SRAM read ~5 pJ, 32-bit DRAM read ~640 pJ, fp32 multiply-add
~4.6 pJ. They set the scale; the ranking of groups, which drives compression, is what matters.

Compression stores a group's weights as int8 (or fewer bits) with one scale per output channel
(weights are rounded in place, so accuracy is that of the quantised model; the energy model
counts the stored width; MACs stay fp32: weight-only quantisation).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedge.tasks.asr.model import SUBSAMPLING, FoldingAttention, StreamingASR


@dataclass(frozen=True)
class EnergyCosts:
    """Memory tiers and compute cost (picojoules)."""

    sram_bytes: int = 256 * 1024
    sram_pj_per_byte: float = 1.25
    dram_pj_per_byte: float = 160.0
    mac_pj: float = 4.6


@dataclass
class WeightGroup:
    """One module's weights and how a second of streaming audio uses them."""

    name: str
    params: int
    bits: float
    invocations_per_s: float
    macs_per_s: float
    tier: str = "dram"

    @property
    def bytes(self) -> int:
        return int(round(self.params * self.bits / 8))

    def energy_uj_per_s(self, costs: EnergyCosts) -> float:
        per_byte = costs.sram_pj_per_byte if self.tier == "sram" else costs.dram_pj_per_byte
        pj = self.invocations_per_s * self.bytes * per_byte + self.macs_per_s * costs.mac_pj
        return pj * 1e-6


def _macs(module: nn.Module, x: torch.Tensor, y: Any) -> int:
    if isinstance(module, FoldingAttention):  # scores q.k and the weighted sum of values
        k = y[1][0]
        return 2 * x.shape[0] * x.shape[1] * module.fold * k.shape[1] * k.shape[2] * k.shape[3]
    if isinstance(module, nn.Linear):
        return x.numel() * module.out_features
    if isinstance(module, nn.Conv1d):
        k = module.kernel_size[0] * module.in_channels // module.groups
        return y.numel() * k
    return x.numel()  # norms: about one multiply-add per element


def weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own parameters directly: the weight groups."""
    return {name: m for name, m in model.named_modules() if any(True for _ in m.parameters(False))}


@torch.no_grad()
def profile_groups(
    model: StreamingASR, seconds: float = 1.0, costs: EnergyCosts | None = None
) -> list[WeightGroup]:
    """Weight groups with invocations and MACs per second of streamed audio, placed in tiers."""
    costs = costs or EnergyCosts()
    modules = weight_modules(model)
    # Attention scores hold no weights but cost MACs, more of them the more a layer is folded.
    modules |= {
        f"{n}.scores": m for n, m in model.named_modules() if isinstance(m, FoldingAttention)
    }
    calls = dict.fromkeys(modules, 0)
    macs = dict.fromkeys(modules, 0)

    def hook(name):
        def record(module, args, output):
            calls[name] += 1
            macs[name] += _macs(module, args[0], output)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    frames = int(round(seconds * 100))  # 10 ms feature frames
    frames -= frames % (SUBSAMPLING * model.cfg.chunk)
    feats = torch.full((1, frames, model.cfg.n_mels), model.cfg.feat_mean)
    was_training = model.training
    try:
        model.eval()
        model.stream(feats)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    audio_s = frames / 100
    groups = [
        WeightGroup(
            name=n,
            params=0 if n.endswith(".scores") else sum(p.numel() for p in m.parameters(False)),
            bits=getattr(m, "weight_bits", 32),
            invocations_per_s=calls[n] / audio_s,
            macs_per_s=macs[n] / audio_s,
        )
        for n, m in modules.items()
    ]
    return place_in_tiers(groups, costs)


def place_in_tiers(groups: list[WeightGroup], costs: EnergyCosts) -> list[WeightGroup]:
    """Fill SRAM with the groups read most often per byte; the rest live in DRAM."""
    free = costs.sram_bytes
    for g in sorted(groups, key=lambda g: (-g.invocations_per_s, g.bytes)):
        fits = g.bytes <= free
        g.tier = "sram" if fits else "dram"
        free -= g.bytes if fits else 0
    return groups


def total_energy(groups: list[WeightGroup], costs: EnergyCosts | None = None) -> float:
    """Estimated microjoules per second of streamed audio (= microwatts)."""
    costs = costs or EnergyCosts()
    return sum(g.energy_uj_per_s(costs) for g in groups)


def energy_metrics(model: nn.Module, costs: EnergyCosts | None = None) -> dict[str, float]:
    """What a client reports: estimated power, weight bytes, and the DRAM share of energy."""
    if not isinstance(model, StreamingASR):
        raise TypeError(f"energy_metrics needs a StreamingASR, got {type(model).__name__}")
    costs = costs or EnergyCosts()
    groups = profile_groups(model, costs=costs)
    total = total_energy(groups, costs)
    dram = sum(g.energy_uj_per_s(costs) for g in groups if g.tier == "dram")
    return {
        "energy_uw": total,
        "weight_bytes": float(sum(g.bytes for g in groups)),
        "energy_dram_share": dram / max(total, 1e-12),
    }


def power_ranking(groups: list[WeightGroup], costs: EnergyCosts | None = None) -> list[str]:
    """Group names, most energy first: the most power-sensitive groups to compress."""
    costs = costs or EnergyCosts()
    return [g.name for g in sorted(groups, key=lambda g: -g.energy_uj_per_s(costs))]


def size_ranking(groups: list[WeightGroup]) -> list[str]:
    """Group names, most parameters first: the conventional compression order."""
    return [g.name for g in sorted(groups, key=lambda g: -g.params)]


@torch.no_grad()
def quantize_weights(model: nn.Module, names: list[str], bits: int = 8) -> nn.Module:
    """A copy whose named groups hold `bits`-bit symmetric integer weights (one scale per output
    channel), counted at that width by the energy model. Biases and norms stay fp32."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be between 2 and 16, got {bits}")
    model = copy.deepcopy(model)
    modules = weight_modules(model)
    unknown = sorted(set(names) - set(modules))
    if unknown:
        raise ValueError(f"no weight groups {unknown}; choose from {sorted(modules)}")
    levels = 2 ** (bits - 1) - 1
    for name in names:
        m = modules[name]
        w = getattr(m, "weight", None)
        if w is None or w.dim() < 2:
            continue  # nothing worth quantising (a norm layer)
        flat = w.view(w.shape[0], -1)
        scale = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / levels
        flat.copy_(torch.round(flat / scale).clamp(-levels, levels) * scale)
        # Bias stays fp32: count the group's bits as the weighted mean of weight and bias.
        n_w, n_all = w.numel(), sum(p.numel() for p in m.parameters(False))
        m.weight_bits = (bits * n_w + 32 * (n_all - n_w)) / n_all
    return model


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, list | tuple):
        return sum(_nbytes(o) for o in obj)
    return 0


@torch.no_grad()
def stream_memory(model: StreamingASR, chunks: int = 8) -> dict[str, int]:
    """Bytes a device holds while streaming, once the left-context cache is full.

    weights: all parameters at their stored width; state: key/value and conv caches carried
    between chunks; activations: the largest working set of one operation within a chunk
    (its inputs plus outputs; for attention, the score matrix); peak: their sum.
    """
    cfg = model.cfg
    step = SUBSAMPLING * cfg.chunk
    feats = torch.full((1, step * max(chunks, cfg.left_chunks + 2), cfg.n_mels), cfg.feat_mean)
    largest = 0

    def record(module, args, output):
        nonlocal largest
        work = _nbytes(args) + _nbytes(output)
        if isinstance(module, FoldingAttention):  # (heads, sub-token queries, keys) scores
            k = output[1][0]
            work = _nbytes(args[0]) * 2 + k.shape[1] * args[0].shape[1] * cfg.fold * k.shape[2] * 4
        largest = max(largest, work)

    leaves = [m for m in model.modules() if not list(m.children())]
    attn = [m for m in model.modules() if isinstance(m, FoldingAttention)]
    state = None
    for start in range(0, feats.shape[1] - step, step):  # fill the cache first
        _, state = model.stream_step(feats[:, start : start + step], state)
    handles = [m.register_forward_hook(record) for m in leaves + attn]
    try:
        _, state = model.stream_step(feats[:, -step:], state)
    finally:
        for h in handles:
            h.remove()
    weights = sum(g.bytes for g in profile_groups(model))
    state_bytes = _nbytes(state.conv) + sum(_nbytes(kv) for kv in state.kv)
    return {
        "weights": weights,
        "state": state_bytes,
        "activations": largest,
        "peak": weights + state_bytes + largest,
    }
