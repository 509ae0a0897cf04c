"""Peers for HRViT at a matched parameter budget: a plain ViT and a small CNN (U-Net).

Both map images (B, 3, H, W) to logits (B, classes, H, W), like `HRViT`, so the same Task
trains and evaluates all three.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PlainViT(nn.Module):
    """Single-scale ViT segmenter (SETR-naive): patchify, global-attention encoder at one
    resolution, a per-token linear classifier, bilinear upsampling to the input size."""

    def __init__(
        self,
        num_classes: int,
        image_size: int = 64,
        patch: int = 4,
        dim: int = 64,
        depth: int = 3,
        heads: int = 4,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        self.patch = patch
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim * mlp_ratio, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.classify = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)
        b, c, h, w = tokens.shape
        if h * w != self.pos.shape[1]:
            raise ValueError(f"PlainViT was built for {self.pos.shape[1]} patches, got {h * w}")
        tokens = self.encoder(tokens.flatten(2).transpose(1, 2) + self.pos)
        logits = self.classify(self.norm(tokens)).transpose(1, 2).reshape(b, -1, h, w)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
    )  # fmt: skip


class SmallUNet(nn.Module):
    """A three-level U-Net: two 3x3 convs per level, max-pool down, bilinear up, skips."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc1, self.enc2 = _double_conv(3, w), _double_conv(w, 2 * w)
        self.enc3 = _double_conv(2 * w, 4 * w)
        self.dec2 = _double_conv(6 * w, 2 * w)
        self.dec1 = _double_conv(3 * w, w)
        self.classify = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([_up(e3, e2), e2], 1))
        d1 = self.dec1(torch.cat([_up(d2, e1), e1], 1))
        return self.classify(d1)


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)
