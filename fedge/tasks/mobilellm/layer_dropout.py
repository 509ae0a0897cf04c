"""LayerSkip's layer dropout: skip whole layers per sample, more often the deeper the layer.

Elhoushi et al., "LayerSkip" (arXiv 2404.16710), Section 4.1. Sample i skips effective layer l
at training step t with probability

    p(l, t) = S(t) * D(l) * p_max,

D(l) = e^(l ln2 / (L-1)) - 1 rising from 0 at the first layer to 1 at the last (linear and
uniform shapes are kept for ablations), and S(t) the time curriculum: 1 throughout
("constant", the paper's choice for continual pretraining and fine-tuning) or
e^(t ln2 / T) - 1 rising from 0 at step 0 to 1 at step T ("exp", its choice for pretraining
from scratch; held at 1 past T). Later layers learn to be optional, so early exits work.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DROPOUT_SCALES = ("exp", "linear", "uniform")
DROPOUT_CURRICULA = ("constant", "exp")


def layer_dropout_rates(depth: int, p_max: float, scale: str = "exp") -> Tensor:
    """D(l) * p_max for l = 0..depth-1: the rates S(t) scales, fixed by depth alone."""
    if not 0.0 <= p_max < 1.0:
        raise ValueError(f"layer dropout p_max must be in [0, 1), got {p_max}")
    depth_frac = torch.arange(depth, dtype=torch.float32) / max(depth - 1, 1)
    if scale == "exp":
        d = 2.0**depth_frac - 1.0
    elif scale == "linear":
        d = depth_frac
    elif scale == "uniform":
        d = torch.ones(depth)
    else:
        raise ValueError(f"unknown layer dropout scale {scale!r}; choose one of {DROPOUT_SCALES}")
    return p_max * d


def dropout_time_scale(step: int, total_steps: int, curriculum: str = "constant") -> float:
    """S(t): how much of the per-layer rate applies at training step t of T."""
    if curriculum not in DROPOUT_CURRICULA:
        raise ValueError(
            f"unknown layer dropout curriculum {curriculum!r}; choose one of {DROPOUT_CURRICULA}"
        )
    if total_steps < 1:
        raise ValueError(f"curriculum_steps must be >= 1, got {total_steps}")
    if curriculum == "constant":
        return 1.0
    return math.exp(min(step, total_steps) * math.log(2) / total_steps) - 1.0


def sample_layer_skip(
    batch: int, rates: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """(batch, depth) bool: which sample skips which layer this step."""
    return torch.rand(batch, len(rates), generator=generator) < rates
