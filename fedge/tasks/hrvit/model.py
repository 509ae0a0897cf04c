"""HRViT: a multi-branch high-resolution vision transformer for semantic segmentation.

Gu et al., "Multi-Scale High-Resolution Vision Transformer for Semantic Segmentation"
(CVPR 2022, arXiv 2111.01236), written from the paper. The whole model is in this file:

    image -> convolutional stem (1/4 resolution) -> 4 stages -> light segmentation head

Stage k runs k+1 parallel branches at 1/4, 1/8, 1/16 and 1/32 resolution. Each stage starts
by opening a new branch at half the resolution of the lowest one (an efficient patch
embedding), then repeats modules: HRViT blocks on every branch, then a fusion layer in which
every branch receives the sum of all branches resampled to its resolution. An HRViT block is

    x = x + HRViTAttention(LN(x));  x = x + MixCFN(LN(x))

HRViTAttention attends within cross-shaped stripe windows (half the heads in horizontal
stripes, half in vertical ones), uses one projection for keys and values (shared K = V),
adds a depthwise convolution of V in parallel, then Hardswish and a projection; a
diversity-enhanced shortcut (a Hardswish linear path from the block input) joins before a
BatchNorm whose scale starts at zero, so the attention branch starts silent. MixCFN puts two
depthwise convolutions (kernel 3 and 5, on half the hidden channels each) between its linear
layers.
The head is SegFormer's all-MLP decoder, which the paper pairs with HRViT on ADE20K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HRViTConfig:
    """Widths and depths of an HRViT segmentation model.

    channels, heads, mlp_ratios, windows: one entry per branch (1/4, 1/8, 1/16, 1/32).
    windows: stripe width of the cross-shaped attention on that branch. blocks[k]: HRViT blocks
    per branch in each module of stage k (k+1 entries). modules[k]: modules in stage k.
    head_dim: width of the segmentation head's shared embedding.
    """

    channels: tuple[int, ...] = (32, 64, 128, 256)
    heads: tuple[int, ...] = (2, 2, 4, 8)
    mlp_ratios: tuple[int, ...] = (4, 4, 4, 4)
    windows: tuple[int, ...] = (1, 2, 7, 7)
    blocks: tuple[tuple[int, ...], ...] = ((1,), (1, 1), (1, 1, 6), (1, 1, 6, 6))
    modules: tuple[int, ...] = (1, 1, 1, 1)
    stem_channels: int = 32
    head_dim: int = 256
    num_classes: int = 150
    in_channels: int = 3
    dropout: float = 0.1

    def __post_init__(self) -> None:
        n = len(self.channels)
        for name in ("heads", "mlp_ratios", "windows"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"HRViTConfig.{name} needs one entry per branch ({n})")
        if len(self.blocks) != n or len(self.modules) != n:
            raise ValueError(f"HRViTConfig.blocks and .modules need one entry per stage ({n})")
        for k, b in enumerate(self.blocks):
            if len(b) != k + 1:
                raise ValueError(f"HRViTConfig.blocks[{k}] needs {k + 1} entries, got {b}")
        for c, h in zip(self.channels, self.heads, strict=True):
            if h % 2 or c % h:
                raise ValueError(
                    f"branch width {c} with {h} heads: heads must be even (half horizontal, "
                    "half vertical) and divide the width"
                )


# Stage settings. The paper's ADE20K table (SegFormer head, 150 classes) gives 8.2M, 20.8M and
# 28.7M parameters for b1, b2 and b3. Widths, MLP ratios and stripe widths (1-2-7-7 on ADE20K)
# follow our reading of the paper; head counts are rounded up to even numbers (half go
# horizontal, half vertical); per-branch depths (few blocks on the high-resolution branches,
# most on 1/16 and 1/32) and head widths are set so the counts land within 5%
# (tests/test_hrvit_model.py): b1 8.28M, b2 21.07M, b3 29.57M. At 512x512 they cost 12.7, 25.7
# and 69.6 GMACs against the table's 14.6, 28.0 and 67.9 GFLOPs (counted as MACs).
CONFIGS: dict[str, HRViTConfig] = {
    "b1": HRViTConfig(),
    "b2": HRViTConfig(
        channels=(48, 96, 240, 384),
        heads=(2, 2, 6, 8),
        mlp_ratios=(2, 3, 3, 3),
        blocks=((2,), (2, 2), (2, 2, 6), (2, 2, 6, 8)),
        stem_channels=48,
        head_dim=256,
    ),
    "b3": HRViTConfig(
        channels=(64, 128, 256, 512),
        heads=(2, 4, 8, 16),
        mlp_ratios=(2, 3, 3, 3),
        blocks=((2,), (2, 2), (2, 2, 6), (2, 2, 6, 6)),
        stem_channels=64,
        head_dim=768,
    ),
    # A CPU-sized model for tests and federated simulation on 32-64 px scenes.
    "tiny": HRViTConfig(
        channels=(16, 32, 48, 64),
        heads=(2, 2, 2, 4),
        mlp_ratios=(2, 2, 2, 2),
        windows=(1, 2, 2, 4),
        blocks=((1,), (1, 1), (1, 1, 1), (1, 1, 1, 1)),
        stem_channels=16,
        head_dim=32,
        num_classes=8,
        dropout=0.0,
    ),
}


# --- HRViT attention -----------------------------------------------------------------


def stripe_attention(q: torch.Tensor, kv: torch.Tensor, heads: int, window: int) -> torch.Tensor:
    """Cross-shaped window attention on (B, H, W, C) maps with shared keys and values.

    The first half of the channels (heads/2 heads) attends within horizontal stripes of
    `window` rows, the second half within vertical stripes of `window` columns. Maps whose
    side is not a multiple of `window` are padded, and the padding is masked out of the keys.
    """
    c = q.shape[-1]
    half = c // 2
    horizontal = _stripes(q[..., :half], kv[..., :half], heads // 2, window)
    vertical = _stripes(
        q[..., half:].transpose(1, 2), kv[..., half:].transpose(1, 2), heads // 2, window
    ).transpose(1, 2)
    return torch.cat([horizontal, vertical], dim=-1)


def _stripes(q: torch.Tensor, kv: torch.Tensor, heads: int, window: int) -> torch.Tensor:
    """Attention within horizontal stripes of `window` rows; (B, H, W, C) in and out."""
    b, h, w, c = q.shape
    s = min(window, h)
    pad = (-h) % s
    if pad:
        q, kv = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, kv))
    n = (h + pad) // s
    d = c // heads

    def windows(t: torch.Tensor) -> torch.Tensor:  # (B, n, heads, s*W, d)
        return t.reshape(b, n, s * w, heads, d).transpose(2, 3)

    mask = None
    if pad:  # keys in padded rows are invisible; only the last stripe has any
        rows = torch.arange(n * s, device=q.device).reshape(n, s, 1).expand(n, s, w)
        mask = (rows < h).reshape(n, 1, 1, s * w)
    v = windows(kv)
    out = F.scaled_dot_product_attention(windows(q), v, v, attn_mask=mask)
    out = out.transpose(2, 3).reshape(b, n * s, w, c)
    return out[:, :h]


class HRViTAttention(nn.Module):
    """Cross-shaped stripe attention with shared K/V, a depthwise-conv path on V, Hardswish,
    a projection, the diversity-enhanced shortcut (a Hardswish linear path from the input) and a
    zero-initialised BatchNorm over their sum, so the whole branch starts at zero."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim)  # one projection serves as both key and value
        self.v_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.act = nn.Hardswish()
        self.proj = nn.Linear(dim, dim)
        self.shortcut = nn.Linear(dim, dim)
        self.norm = nn.BatchNorm1d(dim)
        nn.init.zeros_(self.norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        q, kv = self.q(x), self.kv(x)
        out = stripe_attention(q, kv, self.heads, self.window)
        out = out + self.v_conv(kv.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.proj(self.act(out)) + self.act(self.shortcut(x))
        return self.norm(out.reshape(-1, out.shape[-1])).reshape(out.shape)


class MixCFN(nn.Module):
    """Mixed-scale convolutional feed-forward: linear, depthwise 3x3 and 5x5 on halves of the
    hidden channels, GELU, linear."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        hidden = dim * ratio  # even: widths are divisible by an even number of heads
        self.split = hidden // 2
        self.fc1 = nn.Linear(dim, hidden)
        self.conv3 = nn.Conv2d(self.split, self.split, 3, padding=1, groups=self.split)
        self.conv5 = nn.Conv2d(self.split, self.split, 5, padding=2, groups=self.split)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        h = self.fc1(x).permute(0, 3, 1, 2)
        h = torch.cat([self.conv3(h[:, : self.split]), self.conv5(h[:, self.split :])], dim=1)
        return self.fc2(self.act(h.permute(0, 2, 3, 1)))


class HRViTBlock(nn.Module):
    """Pre-norm transformer block: HRViT attention, then MixCFN, each with a residual."""

    def __init__(self, dim: int, heads: int, window: int, ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = HRViTAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.cfn = MixCFN(dim, ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in and out
        x = x.permute(0, 2, 3, 1)
        x = x + self.attn(self.norm1(x))
        x = x + self.cfn(self.norm2(x))
        return x.permute(0, 3, 1, 2)


# --- multi-branch plumbing -------------------------------------------------------------


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


class PatchEmbed(nn.Sequential):
    """Efficient patch embedding that opens a new branch: pointwise conv to the new width,
    then a stride-2 depthwise 3x3 conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(conv_bn(cin, cout), conv_bn(cout, cout, 3, 2, groups=cout))


class Fusion(nn.Module):
    """Every output branch j sums all input branches resampled to its resolution.

    Lower resolutions (i > j): pointwise conv to width j, then upsampling by 2^(i-j).
    Higher resolutions (i < j): i-j stride-2 depthwise 3x3 convs, the last followed by a
    pointwise conv to width j.
    """

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        self.paths = nn.ModuleList()
        for j, cj in enumerate(channels):
            row = nn.ModuleList()
            for i, ci in enumerate(channels):
                if i == j:
                    row.append(nn.Identity())
                elif i > j:
                    row.append(
                        nn.Sequential(conv_bn(ci, cj), nn.Upsample(scale_factor=2 ** (i - j)))
                    )
                else:
                    steps = [conv_bn(ci, ci, 3, 2, groups=ci) for _ in range(j - i)]
                    row.append(nn.Sequential(*steps, conv_bn(ci, cj)))
            self.paths.append(row)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for row, x in zip(self.paths, xs, strict=True):
            size = x.shape[-2:]
            parts = [path(xi) for path, xi in zip(row, xs, strict=True)]
            # Upsampled or strided maps can be off by one on odd sizes: match the target.
            out.append(sum(p if p.shape[-2:] == size else _resize(p, size) for p in parts))
        return out


def _resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class HRModule(nn.Module):
    """One HR module: HRViT blocks on each branch, then a fusion across branches."""

    def __init__(self, cfg: HRViTConfig, depths: tuple[int, ...]) -> None:
        super().__init__()
        n = len(depths)
        self.branches = nn.ModuleList(
            nn.Sequential(
                *(
                    HRViTBlock(cfg.channels[i], cfg.heads[i], cfg.windows[i], cfg.mlp_ratios[i])
                    for _ in range(depths[i])
                )
            )
            for i in range(n)
        )
        self.fuse = Fusion(cfg.channels[:n]) if n > 1 else None

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        return self.fuse(xs) if self.fuse is not None else xs


class Stage(nn.Module):
    """Open branch k (except in stage 0, fed by the stem), then run the stage's modules."""

    def __init__(self, cfg: HRViTConfig, k: int) -> None:
        super().__init__()
        self.embed = PatchEmbed(cfg.channels[k - 1], cfg.channels[k]) if k > 0 else None
        self.body = nn.Sequential(*(HRModule(cfg, cfg.blocks[k]) for _ in range(cfg.modules[k])))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.embed is not None:
            xs = [*xs, self.embed(xs[-1])]
        for module in self.body:
            xs = module(xs)
        return xs


class SegHead(nn.Module):
    """SegFormer's all-MLP decoder: embed every branch to head_dim, upsample to 1/4, concat,
    fuse with a pointwise conv, classify per pixel."""

    def __init__(self, cfg: HRViTConfig) -> None:
        super().__init__()
        d = cfg.head_dim
        self.embed = nn.ModuleList(nn.Conv2d(c, d, 1) for c in cfg.channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(d * len(cfg.channels), d, 1, bias=False), nn.BatchNorm2d(d), nn.ReLU()
        )
        self.drop = nn.Dropout2d(cfg.dropout)
        self.classify = nn.Conv2d(d, cfg.num_classes, 1)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        size = xs[0].shape[-2:]
        parts = [
            e(x) if x.shape[-2:] == size else _resize(e(x), size)
            for e, x in zip(self.embed, xs, strict=True)
        ]
        return self.classify(self.drop(self.fuse(torch.cat(parts, dim=1))))


class HRViT(nn.Module):
    """HRViT segmentation model: logits (B, num_classes, H, W) at the input resolution."""

    def __init__(self, cfg: HRViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c0 = cfg.stem_channels
        self.stem = nn.Sequential(  # two stride-2 3x3 convs: 1/4 resolution
            *conv_bn(cfg.in_channels, c0, 3, 2),
            nn.Hardswish(),
            *conv_bn(c0, cfg.channels[0], 3, 2),
            nn.Hardswish(),
        )
        self.stages = nn.ModuleList(Stage(cfg, k) for k in range(len(cfg.channels)))
        self.head = SegHead(cfg)
        self.apply(_init)

    def features(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Branch outputs after every stage: stage k gives k+1 maps, at 1/4 ... 1/2^(k+2)."""
        xs = [self.stem(x)]
        out = []
        for stage in self.stages:
            xs = stage(xs)
            out.append(xs)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(x)[-1])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def build_model(name: str | HRViTConfig = "tiny", **overrides: object) -> HRViT:
    """An HRViT by config name ('b1', 'b2', 'b3', 'tiny') or config, e.g.
    build_model("b1", num_classes=150)."""
    if isinstance(name, HRViTConfig):
        cfg = name
    elif name in CONFIGS:
        cfg = CONFIGS[name]
    else:
        raise ValueError(f"unknown HRViT config {name!r}; choose one of {sorted(CONFIGS)}")
    try:
        cfg = replace(cfg, **overrides)
    except TypeError as exc:
        raise ValueError(f"bad HRViT config override: {exc}") from None
    return HRViT(cfg)


__all__ = ["CONFIGS", "HRViT", "HRViTConfig", "build_model", "stripe_attention"]
