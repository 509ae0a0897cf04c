"""Tensor operations the task models share, written so that every exporter keeps them
dynamic in the batch dimension."""

from __future__ import annotations

import torch


def split_even(x: torch.Tensor, parts: int, dim: int = -1) -> tuple[torch.Tensor, ...]:
    """`x.chunk(parts, dim)` for a size `parts` divides, as slices: ExecuTorch's lowering of
    chunk and split fixes the batch size to the traced one, while slices stay dynamic."""
    size = x.shape[dim] // parts
    return tuple(x.narrow(dim, i * size, size) for i in range(parts))
