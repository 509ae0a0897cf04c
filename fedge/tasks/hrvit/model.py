"""HRViT: a multi-branch high-resolution vision transformer for semantic segmentation.

Gu et al., "Multi-Scale High-Resolution Vision Transformer for Semantic Segmentation" (CVPR
2022, arXiv 2111.01236), written here from the paper and the authors' published model
description (facebookresearch/HRViT, read for the architecture and numbers only). The whole
model is in this file:

    image -> stem (two stride-2 3x3 convs, BN, ReLU: 1/4 resolution)
          -> 6 stages -> SegFormer's all-MLP head -> logits at the input resolution

Branches run at 1/4, 1/8, 1/16 and 1/32 resolution; stage k has `len(blocks[k])` of them
(1, 2, 3, 3, 4, 4 in the paper's models). Every stage is

    fusion:  output branch i = GELU(sum over input branches j of j resampled to i), where
             a higher-resolution j is downsampled by ONE depthwise conv of kernel 2^(i-j)+1,
             stride 2^(i-j) (+BN, pointwise conv, BN), a lower one by pointwise conv + BN +
             nearest upsampling; a stage that adds a branch builds it from all branches.
    patch embedding per branch: pointwise conv to the branch width, depthwise 3x3, LayerNorm
    HRViT blocks per branch:  x = x + attn(LN(x)) + DES(x);  x = x + MixCFN(LN(x))
    LayerNorm per branch at the stage end

HRViT attention projects x to Q and V (keys are the values: K = V), attends within
cross-shaped stripes (half the channels in horizontal stripes of `window` rows, half in
vertical ones), adds a parallel depthwise 3x3 conv of Hardswish(V), applies Hardswish, a
projection and a BatchNorm whose scale and shift start at zero. The diversity-enhanced
shortcut DES is a cheap factorised linear layer on the block input: its C features viewed as
(C/p, p), a p x p linear, GELU, a (C/p) x (C/p) linear. MixCFN puts depthwise 3x3 and 5x5
convs (on half the hidden channels each) and a GELU between its two linear layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


def des_split(width: int) -> int:
    """DES factor p: 2^ceil(e/2) for e = floor(log2(width)); the width must be k * p."""
    e = int(math.log2(width))
    return 2 ** (e - e // 2)


@dataclass(frozen=True)
class HRViTConfig:
    """Widths and depths of an HRViT segmentation model.

    channels, mlp_ratios, windows: one entry per branch (1/4 ... 1/32). windows: stripe width
    of the cross-shaped attention. blocks[k][i]: HRViT blocks on branch i in stage k; stage k
    has len(blocks[k]) branches, the first stage one, each stage at most one more than the
    last. head_dim: width of an attention head (a branch has channels/head_dim heads, half per
    stripe direction; a branch narrower than 2 * head_dim has one head per direction).
    stem_channels: stem output width. decoder_dim: the SegFormer head's embedding width.
    """

    channels: tuple[int, ...] = (32, 64, 128, 256)
    blocks: tuple[tuple[int, ...], ...] = (
        (1,), (1, 1), (1, 1, 6), (1, 1, 6), (1, 1, 6, 2), (1, 1, 2, 2),
    )  # fmt: skip
    head_dim: int = 32
    mlp_ratios: tuple[int, ...] = (4, 4, 4, 4)
    windows: tuple[int, ...] = (1, 2, 7, 7)
    stem_channels: int = 64
    decoder_dim: int = 256
    num_classes: int = 150
    in_channels: int = 3
    dropout: float = 0.1

    def __post_init__(self) -> None:
        n = len(self.channels)
        for name in ("mlp_ratios", "windows"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"HRViTConfig.{name} needs one entry per branch ({n})")
        branches = [len(b) for b in self.blocks]
        if not branches or branches[0] != 1 or branches[-1] != n:
            raise ValueError(
                f"HRViTConfig.blocks: the first stage has 1 branch and the last all {n}, "
                f"got {branches}"
            )
        if any(b - a not in (0, 1) for a, b in zip(branches, branches[1:], strict=False)):
            raise ValueError(f"HRViTConfig.blocks: a stage adds at most one branch, {branches}")
        for c in self.channels:
            half = c // 2
            if c % 2 or (half > self.head_dim and half % self.head_dim):
                raise ValueError(
                    f"branch width {c}: each stripe direction takes half of it, which must be "
                    f"at most head_dim {self.head_dim} or a multiple of it"
                )
            if c % des_split(c):
                raise ValueError(f"branch width {c} is not a multiple of its DES factor")


# The paper's models, as the authors' ADE20K SegFormer configs build them (150 classes):
# b1 8.183M, b2 20.810M, b3 28.724M parameters (tests/test_hrvit_model.py pins the counts).
# Blocks per branch over the 6 stages sum to (6, 5, 20, 4), (6, 5, 24, 4) and (6, 5, 24, 6).
CONFIGS: dict[str, HRViTConfig] = {
    "b1": HRViTConfig(),
    "b2": HRViTConfig(
        channels=(48, 96, 240, 384),
        blocks=((1,), (1, 1), (1, 1, 6), (1, 1, 6), (1, 1, 6, 2), (1, 1, 6, 2)),
        head_dim=24,
        mlp_ratios=(2, 3, 3, 3),
    ),
    "b3": HRViTConfig(
        channels=(64, 128, 256, 512),
        blocks=((1,), (1, 1), (1, 1, 6), (1, 1, 6), (1, 1, 6, 3), (1, 1, 6, 3)),
        head_dim=32,
        mlp_ratios=(2, 2, 2, 2),
        decoder_dim=768,
    ),
    # A CPU-sized model (208k parameters) for tests and federated simulation on 32-64 px
    # scenes: the same six stages, branch schedule and block design at small widths, one
    # block per branch per stage, head width 8, stripes sized to 16-2 px maps.
    "tiny": HRViTConfig(
        channels=(16, 32, 32, 48),
        blocks=((1,), (1, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1, 1), (1, 1, 1, 1)),
        head_dim=8,
        mlp_ratios=(2, 2, 2, 2),
        windows=(1, 2, 2, 4),
        stem_channels=16,
        decoder_dim=32,
        num_classes=8,
        dropout=0.0,
    ),
}


# --- HRViT attention -----------------------------------------------------------------


def stripe_attention(q: torch.Tensor, kv: torch.Tensor, heads: int, window: int) -> torch.Tensor:
    """Cross-shaped window attention on (B, H, W, C) maps with shared keys and values.

    The first half of the channels (`heads` heads) attends within horizontal stripes of
    `window` rows, the second half (`heads` more) within vertical stripes of `window`
    columns. Maps whose side is not a multiple of `window` are padded, and the padding is
    masked out of the keys.
    """
    half = q.shape[-1] // 2
    horizontal = _stripes(q[..., :half], kv[..., :half], heads, window)
    vertical = _stripes(
        q[..., half:].transpose(1, 2), kv[..., half:].transpose(1, 2), heads, window
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
    """Q and V from one linear layer (K = V), cross-shaped stripe attention plus a parallel
    depthwise conv of Hardswish(V), Hardswish, projection, and a BatchNorm initialised to
    zero, so the attention path starts silent."""

    def __init__(self, dim: int, head_dim: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.heads = max((dim // 2) // head_dim, 1)  # per stripe direction
        self.qv = nn.Linear(dim, 2 * dim)
        self.v_conv = nn.Sequential(nn.Hardswish(), nn.Conv2d(dim, dim, 3, padding=1, groups=dim))
        self.act = nn.Hardswish()
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.BatchNorm1d(dim)
        nn.init.zeros_(self.norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) in and out
        q, v = self.qv(x).chunk(2, dim=-1)
        out = stripe_attention(q, v, self.heads, self.window)
        out = out + self.v_conv(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.proj(self.act(out))
        return self.norm(out.reshape(-1, out.shape[-1])).reshape(out.shape)


class DES(nn.Module):
    """Diversity-enhanced shortcut: a linear map on C features factorised as (C/p) x p,
    p x p then GELU then (C/p) x (C/p), with p^2 + (C/p)^2 weights instead of C^2."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.p = des_split(dim)
        self.right = nn.Linear(self.p, self.p)
        self.act = nn.GELU()
        self.left = nn.Linear(dim // self.p, dim // self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C)
        y = self.act(self.right(x.unflatten(-1, (-1, self.p))))
        return self.left(y.transpose(-1, -2)).transpose(-1, -2).flatten(-2)


class MixCFN(nn.Module):
    """Mixed-scale convolutional feed-forward: linear, depthwise 3x3 and 5x5 on halves of the
    hidden channels, GELU, linear."""

    def __init__(self, dim: int, ratio: int) -> None:
        super().__init__()
        hidden = dim * ratio
        self.split = hidden // 2
        rest = hidden - self.split
        self.fc1 = nn.Linear(dim, hidden)
        self.conv3 = nn.Conv2d(self.split, self.split, 3, padding=1, groups=self.split)
        self.conv5 = nn.Conv2d(rest, rest, 5, padding=2, groups=rest)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        h = self.fc1(x).permute(0, 3, 1, 2)
        h = torch.cat([self.conv3(h[:, : self.split]), self.conv5(h[:, self.split :])], dim=1)
        return self.fc2(self.act(h.permute(0, 2, 3, 1)))


class HRViTBlock(nn.Module):
    """x + attention(LN(x)) + DES(x), then + MixCFN(LN(.)); (B, H, W, C) in and out."""

    def __init__(self, dim: int, head_dim: int, window: int, ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = HRViTAttention(dim, head_dim, window)
        self.des = DES(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.cfn = MixCFN(dim, ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) + self.des(x)
        return x + self.cfn(self.norm2(x))


# --- multi-branch plumbing -------------------------------------------------------------


class Fusion(nn.Module):
    """Output branch i = GELU(sum of all input branches resampled to branch i).

    Higher resolution j < i: one depthwise conv, kernel 2^(i-j)+1 and stride 2^(i-j), BN,
    pointwise conv to width i, BN. Lower resolution j > i: pointwise conv, BN, nearest
    upsampling by 2^(j-i) (cropped to the target on odd sizes). An output past the inputs is
    a new branch, built from all of them.
    """

    def __init__(self, cin: tuple[int, ...], cout: tuple[int, ...]) -> None:
        super().__init__()
        self.paths = nn.ModuleList()
        for i, co in enumerate(cout):
            row = nn.ModuleList()
            for j, ci in enumerate(cin):
                if i == j:
                    row.append(nn.Identity())
                elif j < i:
                    f = 2 ** (i - j)
                    down = nn.Conv2d(ci, ci, f + 1, f, f // 2, groups=ci, bias=False)
                    row.append(
                        nn.Sequential(
                            down, nn.BatchNorm2d(ci), nn.Conv2d(ci, co, 1), nn.BatchNorm2d(co)
                        )
                    )
                else:
                    row.append(
                        nn.Sequential(
                            nn.Conv2d(ci, co, 1),
                            nn.BatchNorm2d(co),
                            nn.Upsample(scale_factor=2 ** (j - i), mode="nearest"),
                        )
                    )
            self.paths.append(row)
        self.act = nn.GELU()

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, row in enumerate(self.paths):
            # Branch i is ceil(H / 2^i) high: the strided convs land on it exactly and
            # nearest upsampling overshoots by at most one row or column on odd sizes.
            h, w = (xs[i] if i < len(xs) else xs[-1]).shape[-2:]
            if i == len(xs):
                h, w = (h + 1) // 2, (w + 1) // 2
            parts = [path(x)[..., :h, :w] for path, x in zip(row.children(), xs, strict=True)]
            out.append(self.act(torch.stack(parts).sum(0)))
        return out


class PatchEmbed(nn.Module):
    """Per-branch patch embedding at the start of a stage: pointwise conv to the branch
    width, depthwise 3x3 conv, LayerNorm. (B, C, H, W) in, (B, H, W, C') out."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(cin, cout, 1), nn.Conv2d(cout, cout, 3, padding=1, groups=cout)
        )
        self.norm = nn.LayerNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class Stage(nn.Module):
    """Fusion (opening a branch if this stage has one more), then per branch: patch
    embedding, HRViT blocks, LayerNorm. Lists of (B, C, H, W) maps in and out."""

    def __init__(self, cfg: HRViTConfig, cin: tuple[int, ...], blocks: tuple[int, ...]) -> None:
        super().__init__()
        n = len(blocks)
        fused = cin + cfg.channels[len(cin) : n]  # a new branch starts at its own width
        self.fuse = Fusion(cin, fused)
        self.embed = nn.ModuleList(PatchEmbed(fused[i], cfg.channels[i]) for i in range(n))
        self.branches = nn.ModuleList(
            nn.Sequential(
                *(
                    HRViTBlock(cfg.channels[i], cfg.head_dim, cfg.windows[i], cfg.mlp_ratios[i])
                    for _ in range(blocks[i])
                )
            )
            for i in range(n)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.channels[i]) for i in range(n))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        parts = zip(self.fuse(xs), self.embed, self.branches, self.norms, strict=True)
        for x, embed, branch, norm in parts:
            out.append(norm(branch(embed(x))).permute(0, 3, 1, 2))
        return out


class SegHead(nn.Module):
    """SegFormer's all-MLP decoder as HRViT's ADE20K configs use it: a pointwise conv per
    branch to decoder_dim (no norm, no activation), bilinear upsampling to 1/4, concat, a
    pointwise conv + BN + ReLU, dropout, a pointwise classifier."""

    def __init__(self, cfg: HRViTConfig) -> None:
        super().__init__()
        d = cfg.decoder_dim
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


def _resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class HRViT(nn.Module):
    """HRViT segmentation model: logits (B, num_classes, H, W) at the input resolution."""

    def __init__(self, cfg: HRViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.stem_channels
        self.stem = nn.Sequential(  # two stride-2 3x3 convs: 1/4 resolution
            nn.Conv2d(cfg.in_channels, c // 2, 3, 2, 1),
            nn.BatchNorm2d(c // 2),
            nn.ReLU(),
            nn.Conv2d(c // 2, c, 3, 2, 1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
        )
        self.stages = nn.ModuleList()
        widths: tuple[int, ...] = (c,)
        for blocks in cfg.blocks:
            self.stages.append(Stage(cfg, widths, blocks))
            widths = cfg.channels[: len(blocks)]
        self.head = SegHead(cfg)
        self.apply(_init)

    def features(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        """Branch outputs after every stage: stage k gives len(blocks[k]) maps, branch i at
        1/2^(i+2) of the input (sides rounded up)."""
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
        cfg = replace(cfg, **overrides)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ValueError(f"bad HRViT config override: {exc}") from None
    return HRViT(cfg)


__all__ = ["CONFIGS", "HRViT", "HRViTConfig", "build_model", "stripe_attention"]
