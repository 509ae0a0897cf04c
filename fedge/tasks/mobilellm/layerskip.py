"""LayerSkip's training recipe: layer dropout plus the early-exit loss, in one batch loss.

Elhoushi et al., "LayerSkip: Enabling Early Exit Inference and Self-Speculative Decoding"
(arXiv 2404.16710). One technique per module: layer_dropout.py (p(l, t) = S(t) D(l) p_max),
early_exit.py (the loss scales e(l) and the rotational / gradual curricula) and
speculative.py (self-speculative decoding, greedy and sampled). This module holds the
options and combines the first two into the loss a client trains on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedge.tasks.mobilellm.early_exit import (
    early_exit_loss,
    early_exit_scales,
    gradual_curriculum,
    rotational_curriculum,
)
from fedge.tasks.mobilellm.layer_dropout import (
    dropout_time_scale,
    layer_dropout_rates,
    sample_layer_skip,
)
from fedge.tasks.mobilellm.model import Transformer

CURRICULA = ("none", "rotational", "gradual")


@dataclass
class LayerSkipConfig:
    """LayerSkip training options; all off by default (plain next-token loss).

    dropout_max: p_max of layer dropout. dropout_scale: D(l)'s shape. dropout_curriculum:
    S(t), "constant" (fine-tuning) or "exp" (pretraining from scratch). early_exit_scale: s
    in e(l); 0 trains only the last exit. curriculum: which exits are on at a step ("none":
    all). rotation: R of the rotational curriculum. curriculum_steps: T, the training steps
    over which the gradual curriculum and S(t) run.
    """

    dropout_max: float = 0.0
    dropout_scale: str = "exp"
    dropout_curriculum: str = "constant"
    early_exit_scale: float = 0.0
    curriculum: str = "none"
    rotation: int = 4
    curriculum_steps: int = 1000

    def __post_init__(self) -> None:
        layer_dropout_rates(2, self.dropout_max, self.dropout_scale)  # validates both
        dropout_time_scale(0, self.curriculum_steps, self.dropout_curriculum)  # and these
        if self.early_exit_scale < 0:
            raise ValueError(f"early_exit_scale must be >= 0, got {self.early_exit_scale}")
        if self.curriculum not in CURRICULA:
            raise ValueError(f"unknown curriculum {self.curriculum!r}; choose one of {CURRICULA}")

    @property
    def active(self) -> bool:
        return self.dropout_max > 0 or self.early_exit_scale > 0

    def dropout_rates(self, step: int, depth: int) -> Tensor:
        """(depth,) p(l, t) = S(t) D(l) p_max at this step."""
        s = dropout_time_scale(step, self.curriculum_steps, self.dropout_curriculum)
        return s * layer_dropout_rates(depth, self.dropout_max, self.dropout_scale)

    def exits(self, step: int, depth: int) -> Tensor:
        """(depth,) bool: layers whose early-exit loss counts at this step."""
        if self.early_exit_scale == 0:
            on = torch.zeros(depth, dtype=torch.bool)
            on[-1] = True
            return on
        if self.curriculum == "rotational":
            return rotational_curriculum(step, depth, self.rotation)
        if self.curriculum == "gradual":
            return gradual_curriculum(step, depth, self.curriculum_steps)
        return torch.ones(depth, dtype=torch.bool)


def layerskip_loss(
    model: Transformer, idx: Tensor, targets: Tensor, cfg: LayerSkipConfig, step: int
) -> Tensor:
    """The training loss of one batch under layer dropout and the early-exit curriculum."""
    depth = model.depth
    skip = None
    if cfg.dropout_max > 0:
        skip = sample_layer_skip(idx.shape[0], cfg.dropout_rates(step, depth)).to(idx.device)
    weights = early_exit_scales(depth, cfg.early_exit_scale)
    exits = (cfg.exits(step, depth) & (weights > 0)).nonzero().flatten().tolist()
    _, hidden = model.run_layers(model.embed(idx), 0, depth, skip=skip, keep=exits)
    return early_exit_loss(model, hidden, targets, weights)
