"""LayerSkip's early-exit loss: every exit reads the one shared head (final norm + LM head).

Elhoushi et al., "LayerSkip" (arXiv 2404.16710), Section 4.2. With effective layers
l = 0..L-1, J = sum_l w_l CE_l / sum_l w_l over the layers the curriculum C(t, l) enables, and
e(l) = s * sum_{i<=l} i for l < L-1, e(L-1) = L-1 + s * sum_{i<=L-2} i (later exits weigh
more; s is the early-exit scale, 0 trains only the last exit). Curricula: rotational (every
R-th layer, rotating by step) and gradual (from the last layer down, one more every T/(2L)
steps, all from T/2 on), so that the early exits do not slow the last one's training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fedge.tasks.mobilellm.model import Transformer


def early_exit_scales(depth: int, e_scale: float) -> Tensor:
    """e(l): the paper's unnormalised early-exit loss weights, growing with depth."""
    layer = torch.arange(depth, dtype=torch.float32)
    e = e_scale * layer * (layer + 1) / 2  # e_scale * sum_{i<=l} i
    e[-1] = (depth - 1) + e[-2] if depth > 1 else 1.0
    return e


def rotational_curriculum(step: int, depth: int, rotation: int) -> Tensor:
    """C_rot: early exit at layers l with l mod R == step mod R (and always the last)."""
    if rotation < 1:
        raise ValueError(f"rotation must be >= 1, got {rotation}")
    on = torch.arange(depth) % rotation == step % rotation
    on[-1] = True
    return on


def gradual_curriculum(step: int, depth: int, total_steps: int) -> Tensor:
    """C_grad: the last layer from the start, then one more layer downwards every
    total_steps / (2 * depth) steps, so every layer exits from total_steps / 2 on."""
    if total_steps < 1:
        raise ValueError(f"curriculum_steps must be >= 1, got {total_steps}")
    added = int(step * 2 * depth / total_steps)
    return torch.arange(depth) >= depth - 1 - added


def early_exit_loss(
    model: Transformer, hidden: dict[int, Tensor], targets: Tensor, weights: Tensor
) -> Tensor:
    """sum_l w_l CE(exit(h_l), y) / sum_l w_l over the layers in `hidden`."""
    total = sum(weights[layer] for layer in hidden)
    loss = torch.zeros((), device=targets.device)
    for layer, h in hidden.items():
        ce = F.cross_entropy(model.logits(h).flatten(0, 1), targets.flatten())
        loss = loss + weights[layer] / total * ce
    return loss
