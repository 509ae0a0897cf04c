"""HRViT semantic segmentation as a fedge Task: mIoU and pixel accuracy.

Without `data_dir` the task draws procedural scenes (8 classes); `train_labels()` gives each
image's dominant class (for label-skew partitions) and `train_groups()` its style (one style
per client is feature-skew non-IID). With `data_dir` it reads an ADE20K or Cityscapes folder.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from fedge.tasks.base import Batch, Task
from fedge.tasks.hrvit.data import (
    CLASSES,
    IGNORE,
    ProceduralScenes,
    SceneArrays,
    SegmentationFolder,
)
from fedge.tasks.hrvit.model import CONFIGS, build_model

TEST_START = 1_000_000  # procedural test scenes are numbered from here, apart from training


def confusion(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Confusion matrix (true x predicted) over labelled pixels."""
    valid = target != IGNORE
    pred = logits.argmax(1)[valid]
    true = target[valid]
    return torch.bincount(true * num_classes + pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def segmentation_metrics(sums: dict[str, float], num_classes: int) -> dict[str, float]:
    """mIoU over classes that occur in the labels or predictions, and pixel accuracy."""
    inter = np.array([sums.get(f"inter_{k}", 0.0) for k in range(num_classes)])
    union = np.array([sums.get(f"union_{k}", 0.0) for k in range(num_classes)])
    seen = union > 0
    return {
        "miou": float((inter[seen] / union[seen]).mean()) if seen.any() else 0.0,
        "pixel_accuracy": sums.get("pixel_correct", 0.0) / max(sums.get("pixel_total", 0.0), 1.0),
    }


class HRViTTask(Task):
    """Semantic segmentation with HRViT.

    Options: config ('tiny', 'b1', 'b2', 'b3'; default 'tiny'), image_size (side in pixels,
    default 64), num_images (training pool size; default 512 procedural scenes, or every
    image of a folder), num_test_images (default 128 procedural scenes, or every image of the
    folder's validation split), num_styles (procedural client styles, default 4).
    """

    name = "hrvit"
    metric = "miou"
    higher_is_better = True

    def __init__(
        self,
        data_dir: str | None = None,
        seed: int = 0,
        config: str = "tiny",
        image_size: int = 64,
        num_images: int = 0,
        num_test_images: int = 0,
        num_styles: int = 4,
        **options: Any,
    ) -> None:
        super().__init__(data_dir=data_dir, seed=seed, **options)
        if config not in CONFIGS:
            raise ValueError(f"hrvit config {config!r} unknown; choose one of {sorted(CONFIGS)}")
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32 (the 1/32 branch), got {image_size}")
        self.config, self.image_size = config, int(image_size)
        self._groups: np.ndarray | None = None
        if data_dir:
            self._train: SegmentationFolder | SceneArrays = SegmentationFolder(
                data_dir, "train", self.image_size, int(num_images)
            )
            self._test: SegmentationFolder | SceneArrays = SegmentationFolder(
                data_dir, "test", self.image_size, int(num_test_images)
            )
            self.num_classes = self._train.num_classes
            self._labels: np.ndarray | None = None  # read lazily: it scans every mask
        else:
            self.num_classes = len(CLASSES)
            scenes = ProceduralScenes.generate(
                seed, int(num_images or 512), self.image_size, int(num_styles), self.num_classes
            )
            test = ProceduralScenes.generate(
                seed,
                int(num_test_images or 128),
                self.image_size,
                int(num_styles),
                self.num_classes,
                start=TEST_START,
            )
            self._train, self._test = scenes.data, test.data
            self._labels = scenes.dominant_classes(self.num_classes)
            self._groups = scenes.style

    # --- model and data -------------------------------------------------------------
    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return build_model(self.config, num_classes=self.num_classes)

    def train_labels(self) -> np.ndarray:
        """Each training image's dominant class (the most frequent non-background class)."""
        if self._labels is None:  # only folders read their labels lazily
            assert isinstance(self._train, SegmentationFolder)
            self._labels = self._train.dominant_classes()
        return self._labels

    def train_groups(self) -> np.ndarray | None:
        """Procedural scenes: the style id of each image; folders: None."""
        return self._groups

    def train_dataset(self, indices: np.ndarray | None = None) -> Dataset:
        if indices is None:
            return self._train
        return Subset(self._train, np.asarray(indices, dtype=np.int64).tolist())

    def test_dataset(self) -> Dataset:
        return self._test

    # --- learning -------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        images, masks = batch
        return F.cross_entropy(model(images), masks, ignore_index=IGNORE)

    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """Loss summed over images, per-class intersection and union pixel counts, and
        pixel correct/total (all additive across batches and clients)."""
        images, masks = batch
        logits = model(images)
        per_pixel = F.cross_entropy(logits, masks, ignore_index=IGNORE, reduction="none")
        labelled = (masks != IGNORE).flatten(1).sum(1).clamp(min=1)
        per_image = per_pixel.flatten(1).sum(1) / labelled
        conf = confusion(logits, masks, self.num_classes).double()
        inter = conf.diag()
        union = conf.sum(0) + conf.sum(1) - inter
        sums = {
            "loss": float(per_image.sum()),
            "num_examples": float(images.shape[0]),
            "pixel_correct": float(inter.sum()),
            "pixel_total": float(conf.sum()),
        }
        for k in range(self.num_classes):
            sums[f"inter_{k}"] = float(inter[k])
            sums[f"union_{k}"] = float(union[k])
        return sums

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("num_examples", 0.0), 1.0)
        return {
            "loss": sums.get("loss", 0.0) / n,
            "num_examples": sums.get("num_examples", 0.0),
            **segmentation_metrics(sums, self.num_classes),
        }

    def evaluate(self, model: nn.Module, data: Dataset, batch_size: int = 32) -> dict[str, float]:
        """Evaluation in batches of 32: dense logits are large (classes x pixels per image)."""
        return super().evaluate(model, data, batch_size=batch_size)
