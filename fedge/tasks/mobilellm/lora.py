"""LoRA adapters (Hu et al., arXiv 2106.09685) so a device trains and ships a small update.

Each wrapped projection keeps its frozen weight under the same state_dict key and adds
`lora_a` (rank x in) and `lora_b` (out x rank): y = W x + (alpha / rank) B A x. B starts at
zero, so the adapted model starts as the base model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A bias-free linear layer with a frozen weight and a trainable low-rank update."""

    weight: nn.Parameter
    lora_a: nn.Parameter
    lora_b: nn.Parameter
    scale: float

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear wraps bias-free projections only")
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(x, self.lora_a), self.lora_b)
        return F.linear(x, self.weight) + update * self.scale


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=TARGETS) -> nn.Module:
    """Freeze every parameter, then wrap the named projections with trainable adapters."""
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))
    return model


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors a client has to ship: trainable parameters, by state_dict key."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def state_bytes(state: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
