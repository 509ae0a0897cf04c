"""HRViTTask: exact mIoU/pixel-accuracy sums, options, partitions, learning."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fedge.tasks.base import TrainConfig
from fedge.tasks.hrvit.data import IGNORE
from fedge.tasks.hrvit.task import HRViTTask
from fedge.tasks.registry import build_task


class FixedPrediction(nn.Module):
    """Predicts a given label map (as one-hot logits) whatever the image."""

    def __init__(self, pred: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.pred, self.num_classes = pred, num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        onehot = nn.functional.one_hot(self.pred, self.num_classes).permute(0, 3, 1, 2)
        return onehot.float().expand(images.shape[0], -1, -1, -1) * 10


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task():
    return HRViTTask(seed=0, image_size=32, num_images=48, num_test_images=16)


def test_miou_and_pixel_accuracy_are_exact(task):
    k = task.num_classes
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 1, IGNORE]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 3]]])
    sums = task.eval_sums(FixedPrediction(pred, k), (torch.zeros(1, 3, 2, 4), target))
    # class 0: inter 1, union 3; class 1: inter 2, union 4; class 2: inter 1, union 3;
    # class 3 is only predicted on an ignored pixel, so it does not count.
    assert [sums[f"inter_{c}"] for c in range(4)] == [1, 2, 1, 0]
    assert [sums[f"union_{c}"] for c in range(4)] == [3, 4, 3, 0]
    assert (sums["pixel_correct"], sums["pixel_total"]) == (4, 7)
    metrics = task.finalize(sums)
    assert metrics["miou"] == pytest.approx((1 / 3 + 2 / 4 + 1 / 3) / 3, abs=1e-12)
    assert metrics["pixel_accuracy"] == pytest.approx(4 / 7, abs=1e-12)


def test_sums_add_up_across_batches(task):
    model = task.build_model().eval()
    data = task.test_dataset()
    whole = task.evaluate(model, data, batch_size=16)
    parts = task.evaluate(model, data, batch_size=5)
    assert whole["miou"] == pytest.approx(parts["miou"], rel=1e-9)
    assert whole["pixel_accuracy"] == pytest.approx(parts["pixel_accuracy"], rel=1e-9)
    assert whole["loss"] == pytest.approx(parts["loss"], rel=1e-5)


def test_labels_groups_and_partitions(task):
    labels, groups = task.train_labels(), task.train_groups()
    assert labels.shape == groups.shape == (48,)
    assert set(labels) <= set(range(1, task.num_classes)) and len(set(labels)) >= 5
    assert sorted(set(groups.tolist())) == [0, 1, 2, 3]
    subset = task.train_dataset(np.flatnonzero(groups == 2))
    assert len(subset) == 12
    image, mask = subset[0]
    assert torch.equal(image, task.train_dataset()[2][0])


def test_short_training_run_lowers_the_loss(task):
    model = task.build_model()
    data = task.train_dataset()
    before = task.evaluate(model, data)["loss"]
    cfg = TrainConfig(epochs=4, batch_size=8, lr=0.1, momentum=0.9)
    report = task.train(model, data, cfg)
    after = task.evaluate(model, data)["loss"]
    assert report.steps == 24
    assert after < 0.7 * before, (before, after)


def test_registry_and_options():
    built = build_task("hrvit", seed=1, image_size=32, num_images=4, num_test_images=2)
    assert isinstance(built, HRViTTask) and built.metric == "miou"
    with pytest.raises(ValueError, match="unknown options"):
        HRViTTask(image_size=32, num_images=4, depth=3)
    with pytest.raises(ValueError, match="config 'b7' unknown"):
        HRViTTask(config="b7")
    with pytest.raises(ValueError, match="image_size must be at least 32"):
        HRViTTask(image_size=16)


def test_task_reads_an_ade20k_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        for i in range(2):
            (tmp_path / "images" / split).mkdir(parents=True, exist_ok=True)
            (tmp_path / "annotations" / split).mkdir(parents=True, exist_ok=True)
            image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "images" / split / f"{i}.jpg")
            mask = np.full((40, 40), 3 + i, dtype=np.uint8)
            Image.fromarray(mask).save(tmp_path / "annotations" / split / f"{i}.png")
    task = HRViTTask(data_dir=str(tmp_path), image_size=32)
    assert task.num_classes == 150 and task.train_groups() is None
    assert task.train_labels().tolist() == [2, 3]
    metrics = task.evaluate(task.build_model().eval(), task.test_dataset())
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["num_examples"] == 2
    capped = HRViTTask(data_dir=str(tmp_path), image_size=32, num_images=1, num_test_images=1)
    assert len(capped.train_dataset()) == len(capped.test_dataset()) == 1
