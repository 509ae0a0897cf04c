"""Segmentation data: procedurally drawn scenes, and image+mask folders (ADE20K, Cityscapes).

Procedural scenes need no download. Each scene is a textured background with a large object
of one main class and a few smaller objects of others; every object class has its own shape
and texture, and the mask labels every pixel. A *style* (one per client, for feature-skew
non-IID) changes the palette (a hue rotation), the texture frequency and the lighting (gain,
a directional gradient, sensor noise). The main class drives label-skew partitions. Scene i of
a pool is a pure function of (seed, i), so every client can rebuild exactly its own share.

Folders load real datasets from `--data-dir` in their usual layouts (see `SegmentationFolder`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

IGNORE = 255  # mask value that loss and metrics skip

CLASSES = ("background", "disk", "box", "triangle", "ring", "ellipse", "cross", "band")
# Base colours (RGB in [0, 1]) before a style's hue rotation.
COLOURS = np.array(
    [
        [0.45, 0.42, 0.38],
        [0.85, 0.20, 0.20],
        [0.20, 0.70, 0.25],
        [0.20, 0.35, 0.85],
        [0.90, 0.75, 0.15],
        [0.70, 0.25, 0.80],
        [0.15, 0.80, 0.80],
        [0.95, 0.55, 0.35],
    ],
    dtype=np.float32,
)
MEAN, STD = 0.5, 0.25  # pixel normalisation for both procedural and folder images


@dataclass(frozen=True)
class Style:
    """How one client's camera and world look: palette, texture scale, lighting."""

    hue: float  # rotation of the colour wheel, radians
    texture_scale: float  # multiplies every texture's frequency
    gain: float  # overall brightness
    gradient: float  # strength of the directional lighting ramp
    direction: float  # angle of that ramp, radians
    noise: float  # std of additive pixel noise

    @staticmethod
    def draw(seed: int, style_id: int) -> Style:
        rng = np.random.default_rng([seed, 7919, style_id])
        return Style(
            hue=float(rng.uniform(0, 2 * math.pi)) if style_id else 0.0,
            texture_scale=float(rng.uniform(0.7, 1.5)),
            gain=float(rng.uniform(0.65, 1.15)),
            gradient=float(rng.uniform(0.0, 0.6)),
            direction=float(rng.uniform(0, 2 * math.pi)),
            noise=float(rng.uniform(0.01, 0.06)),
        )


def _hue_matrix(theta: float) -> np.ndarray:
    """Rotation of RGB about the grey axis by theta (a hue shift that keeps brightness)."""
    c, s = math.cos(theta), math.sin(theta)
    k = (1 - c) / 3
    r = math.sqrt(1 / 3) * s
    return np.array(
        [[c + k, k - r, k + r], [k + r, c + k, k - r], [k - r, k + r, c + k]], dtype=np.float32
    )


def _texture(cls: int, x: np.ndarray, y: np.ndarray, f: float, rng: np.random.Generator):
    """Per-class texture in [0, 1] on normalised coordinates, at frequency scale f."""
    tau = 2 * math.pi
    if cls == 0:  # background: smooth random waves
        t = sum(
            np.sin(tau * f * (a * x + b * y) + p)
            for a, b, p in rng.uniform([-2, -2, 0], [2, 2, tau], size=(3, 3))
        )
        return 0.5 + t / 6
    if cls == 1:  # disk: flat
        return np.ones_like(x)
    if cls == 2:  # box: checkerboard
        return ((np.floor(x * 10 * f) + np.floor(y * 10 * f)) % 2).astype(np.float32)
    if cls == 3:  # triangle: horizontal stripes
        return (np.sin(tau * 7 * f * y) > 0).astype(np.float32)
    if cls == 4:  # ring: dots
        return ((np.sin(tau * 8 * f * x) * np.sin(tau * 8 * f * y)) > 0.3).astype(np.float32)
    if cls == 5:  # ellipse: diagonal stripes
        return (np.sin(tau * 6 * f * (x + y)) > 0).astype(np.float32)
    if cls == 6:  # cross: speckle
        return rng.random(x.shape).astype(np.float32)
    return 0.5 + 0.5 * np.sin(tau * 3 * f * x)  # band: a slow ripple


def _shape(cls: int, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, big: bool):
    """Boolean mask of one object of class `cls` at a random place and size."""
    r = rng.uniform(0.25, 0.38) if big else rng.uniform(0.1, 0.2)
    cx, cy = rng.uniform(0.2, 0.8, size=2)
    dx, dy = x - cx, y - cy
    if cls == 1:
        return dx**2 + dy**2 < r**2
    if cls == 2:
        a, b = rng.uniform(0.6, 1.0, size=2)
        return (np.abs(dx) < r * a) & (np.abs(dy) < r * b)
    if cls == 3:
        return (dy > -r) & (dy < r) & (np.abs(dx) < (dy + r) / 2)
    if cls == 4:
        d2 = dx**2 + dy**2
        return (d2 < r**2) & (d2 > (0.55 * r) ** 2)
    if cls == 5:
        t = rng.uniform(0, math.pi)
        u, v = dx * math.cos(t) + dy * math.sin(t), -dx * math.sin(t) + dy * math.cos(t)
        return (u / r) ** 2 + (v / (0.45 * r)) ** 2 < 1
    if cls == 6:
        w = 0.3 * r
        return ((np.abs(dx) < w) & (np.abs(dy) < r)) | ((np.abs(dy) < w) & (np.abs(dx) < r))
    # band: everything above a wavy horizon
    level = rng.uniform(0.3, 0.55) if big else rng.uniform(0.1, 0.25)
    return y < level + 0.05 * np.sin(2 * math.pi * rng.uniform(1, 3) * x + rng.uniform(0, 6))


def draw_scene(
    seed: int, index: int, size: int, style: Style, num_classes: int = len(CLASSES)
) -> tuple[np.ndarray, np.ndarray]:
    """Scene `index` of pool `seed`: image uint8 (3, size, size) and mask uint8 (size, size).

    The main class gets one large object; one to three small objects of any object class
    follow, drawn later so they occlude it. Classes >= num_classes are not used.
    """
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be in [2, {len(CLASSES)}], got {num_classes}")
    rng = np.random.default_rng([seed, index])
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    main = int(rng.integers(1, num_classes))
    others = rng.integers(1, num_classes, size=int(rng.integers(1, 4)))
    mask = np.zeros((size, size), dtype=np.uint8)
    for k, cls in enumerate([main, *others.tolist()]):
        mask[_shape(cls, x, y, rng, big=k == 0)] = cls
    hue = _hue_matrix(style.hue)
    image = np.zeros((3, size, size), dtype=np.float32)
    for cls in np.unique(mask):
        where = mask == cls
        colour = np.clip(hue @ COLOURS[cls], 0.05, 1.0)
        shade = 0.55 + 0.45 * _texture(int(cls), x, y, style.texture_scale, rng)
        image[:, where] = colour[:, None] * shade[where][None]
    ramp = x * math.cos(style.direction) + y * math.sin(style.direction) - 0.5
    image *= style.gain * (1 + style.gradient * ramp)[None]
    image += rng.normal(0, style.noise, size=image.shape).astype(np.float32)
    image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    return image, mask


class SceneArrays(Dataset):
    """Images (N, 3, H, W) uint8 and masks (N, H, W) uint8 in memory; items are a normalised
    float image and an int64 mask."""

    def __init__(self, images: np.ndarray, masks: np.ndarray) -> None:
        if images.shape[0] != masks.shape[0] or images.shape[2:] != masks.shape[1:]:
            raise ValueError(f"images {images.shape} and masks {masks.shape} do not match")
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return normalise(self.images[i]), torch.from_numpy(self.masks[i].astype(np.int64))


def normalise(image: np.ndarray) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 roughly in [-2, 2]."""
    return (torch.from_numpy(image).float() / 255 - MEAN) / STD


@dataclass
class ProceduralScenes:
    """A pool of procedural scenes with each image's style id."""

    data: SceneArrays
    style: np.ndarray

    @staticmethod
    def generate(
        seed: int,
        num_images: int,
        size: int,
        num_styles: int,
        num_classes: int = len(CLASSES),
        start: int = 0,
    ) -> ProceduralScenes:
        """Scenes start .. start+num_images-1; scene i has style i % num_styles, so styles
        are balanced. Disjoint `start` ranges give disjoint pools (train and test)."""
        if num_images < 1 or size < 8 or num_styles < 1:
            raise ValueError(
                f"need num_images >= 1, image_size >= 8, num_styles >= 1; got {num_images}, "
                f"{size}, {num_styles}"
            )
        styles = [Style.draw(seed, s) for s in range(num_styles)]
        images = np.empty((num_images, 3, size, size), dtype=np.uint8)
        masks = np.empty((num_images, size, size), dtype=np.uint8)
        style = (start + np.arange(num_images)) % num_styles
        for i in range(num_images):
            images[i], masks[i] = draw_scene(seed, start + i, size, styles[style[i]], num_classes)
        return ProceduralScenes(SceneArrays(images, masks), style)

    def dominant_classes(self, num_classes: int) -> np.ndarray:
        """Per-image dominant class, for label-skew partitions."""
        return np.array([dominant_class(m, num_classes) for m in self.data.masks], dtype=np.int64)


def dominant_class(mask: np.ndarray, num_classes: int) -> int:
    """The most frequent labelled class of a mask, preferring any non-background class
    (class 0) when one is present; background if the mask has nothing else."""
    counts = np.bincount(mask[mask != IGNORE].ravel(), minlength=num_classes)[:num_classes]
    if counts[1:].sum() > 0:
        return int(np.argmax(counts[1:]) + 1)
    return 0


# --- image + mask folders ----------------------------------------------------------------

# Cityscapes labelIds -> trainIds (19 evaluated classes; everything else is ignored).
_CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class SegmentationFolder(Dataset):
    """Image and mask pairs from a folder, resized to `size` x `size`, read lazily.

    Layouts (found under `root`, or under `root/ADEChallengeData2016`):
      ADE20K:     images/{training,validation}/NAME.jpg + annotations/{...}/NAME.png;
                  mask 0 ("other") is ignored and class k becomes k-1 (150 classes).
      Cityscapes: leftImg8bit/{train,val}/CITY/X_leftImg8bit.png +
                  gtFine/{train,val}/CITY/X_gtFine_labelTrainIds.png (or _labelIds.png,
                  mapped to the 19 train ids); 255 is ignored.
    split is "train" or "test" (ADE20K validation, Cityscapes val).
    """

    def __init__(self, root: str | Path, split: str, size: int, num_images: int = 0) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        root = Path(root)
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        self.size = size
        if (root / "images").is_dir() and (root / "annotations").is_dir():
            self.layout, self.num_classes = "ade20k", 150
            self.pairs = _ade_pairs(root, "training" if split == "train" else "validation")
        elif (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
            self.layout, self.num_classes = "cityscapes", 19
            self.pairs = _cityscapes_pairs(root, "train" if split == "train" else "val")
        else:
            raise ValueError(
                f"{root} is neither an ADE20K folder (images/ + annotations/) nor a Cityscapes "
                "folder (leftImg8bit/ + gtFine/); point --data-dir at the dataset root"
            )
        if not self.pairs:
            raise ValueError(f"no image/mask pairs for split {split!r} under {root}")
        if num_images:
            self.pairs = self.pairs[:num_images]

    def __len__(self) -> int:
        return len(self.pairs)

    def read_mask(self, i: int) -> np.ndarray:
        """Mask i, resized (nearest) and mapped to 0..num_classes-1 with IGNORE elsewhere."""
        from PIL import Image

        with Image.open(self.pairs[i][1]) as im:
            raw = np.asarray(im.resize((self.size, self.size), Image.Resampling.NEAREST)).astype(
                np.int64
            )
        if raw.ndim != 2:
            raise ValueError(f"mask {self.pairs[i][1]} is not single-channel")
        if self.layout == "ade20k":
            out = np.where(raw == 0, IGNORE, raw - 1)
        elif self.pairs[i][1].name.endswith("_labelIds.png"):
            lut = np.full(256, IGNORE, dtype=np.int64)
            lut[list(_CITYSCAPES_TRAIN_IDS)] = list(_CITYSCAPES_TRAIN_IDS.values())
            out = lut[raw]
        else:
            out = raw
        out[(out >= self.num_classes) & (out != IGNORE)] = IGNORE
        return out.astype(np.uint8)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        with Image.open(self.pairs[i][0]) as im:
            rgb = im.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        image = np.asarray(rgb).transpose(2, 0, 1).copy()
        return normalise(image), torch.from_numpy(self.read_mask(i).astype(np.int64))

    def dominant_classes(self) -> np.ndarray:
        """Per-image dominant class (reads every mask once)."""
        return np.array(
            [dominant_class(self.read_mask(i), self.num_classes) for i in range(len(self))],
            dtype=np.int64,
        )


def _ade_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    pairs = []
    for image in sorted((root / "images" / split).glob("*")):
        if image.suffix.lower() in _IMAGE_SUFFIXES:
            mask = root / "annotations" / split / (image.stem + ".png")
            if mask.exists():
                pairs.append((image, mask))
    return pairs


def _cityscapes_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    pairs = []
    for image in sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
        stem = image.name.removesuffix("_leftImg8bit.png")
        folder = root / "gtFine" / split / image.parent.name
        for suffix in ("_gtFine_labelTrainIds.png", "_gtFine_labelIds.png"):
            if (folder / (stem + suffix)).exists():
                pairs.append((image, folder / (stem + suffix)))
                break
    return pairs
