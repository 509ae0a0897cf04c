"""HRViT data: deterministic procedural scenes with class and style skew; folder loaders."""

import numpy as np
import pytest
import torch
from PIL import Image

from fedge.tasks.hrvit.data import (
    CLASSES,
    IGNORE,
    ProceduralScenes,
    SegmentationFolder,
    Style,
    dominant_class,
    draw_scene,
)


def test_scenes_are_deterministic_per_seed_and_differ_across_seeds():
    a = ProceduralScenes.generate(seed=3, num_images=6, size=32, num_styles=2)
    b = ProceduralScenes.generate(seed=3, num_images=6, size=32, num_styles=2)
    c = ProceduralScenes.generate(seed=4, num_images=6, size=32, num_styles=2)
    assert np.array_equal(a.data.images, b.data.images)
    assert np.array_equal(a.data.masks, b.data.masks)
    assert not np.array_equal(a.data.masks, c.data.masks)


def test_scene_i_is_the_same_wherever_it_is_generated():
    pool = ProceduralScenes.generate(seed=1, num_images=5, size=32, num_styles=3)
    tail = ProceduralScenes.generate(seed=1, num_images=2, size=32, num_styles=3, start=3)
    assert np.array_equal(pool.data.images[3:], tail.data.images)
    assert np.array_equal(pool.style[3:], tail.style)


def test_style_changes_appearance_but_not_labels():
    plain, shifted = Style.draw(0, 0), Style.draw(0, 1)
    img_a, mask_a = draw_scene(0, 11, 48, plain)
    img_b, mask_b = draw_scene(0, 11, 48, shifted)
    assert np.array_equal(mask_a, mask_b)
    assert np.abs(img_a.astype(int) - img_b.astype(int)).mean() > 10


def test_every_class_appears_and_dominant_labels_are_skewable():
    pool = ProceduralScenes.generate(seed=0, num_images=200, size=32, num_styles=4)
    assert set(np.unique(pool.data.masks)) == set(range(len(CLASSES)))
    labels = pool.dominant_classes(len(CLASSES))
    # every object class is some image's dominant class, so k-class splits have material
    assert set(labels) == set(range(1, len(CLASSES)))
    for mask, label in zip(pool.data.masks[:20], labels[:20], strict=True):
        counts = np.bincount(mask.ravel(), minlength=len(CLASSES))
        assert counts[label] == counts[1:].max()
    assert np.bincount(pool.style).tolist() == [50, 50, 50, 50]


def test_dominant_class_ignores_ignored_pixels_and_prefers_objects():
    mask = np.array([[0, 0, 0, 2], [IGNORE, IGNORE, IGNORE, 1]], dtype=np.uint8)
    assert dominant_class(mask, 3) in (1, 2)
    assert dominant_class(np.zeros((2, 2), dtype=np.uint8), 3) == 0


def test_items_are_normalised_images_and_int64_masks():
    pool = ProceduralScenes.generate(seed=0, num_images=2, size=32, num_styles=1)
    image, mask = pool.data[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (32, 32) and mask.dtype == torch.int64
    assert -2.1 <= image.min() and image.max() <= 2.1


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _rgb(seed, h=20, w=30):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_ade20k_folder_maps_zero_to_ignore_and_shifts_classes(tmp_path):
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[:, 10:] = 5  # ADE class 5 -> train id 4
    mask[:, 25:] = 150  # last ADE class -> 149
    for split, n in (("training", 3), ("validation", 1)):
        for i in range(n):
            _png(tmp_path / "images" / split / f"ADE_{i}.png", _rgb(i))
            _png(tmp_path / "annotations" / split / f"ADE_{i}.png", mask)
    _png(tmp_path / "images" / "training" / "no_mask.png", _rgb(9))  # skipped: no annotation
    train = SegmentationFolder(tmp_path, "train", size=15)
    assert (len(train), train.num_classes, train.layout) == (3, 150, "ade20k")
    image, got = train[0]
    assert image.shape == (3, 15, 15) and got.shape == (15, 15)
    assert set(got.unique().tolist()) == {4, 149, IGNORE}
    assert (got[:, :5] == IGNORE).all() and (got[:, 5:12] == 4).all()
    assert train.dominant_classes().tolist() == [4, 4, 4]
    assert len(SegmentationFolder(tmp_path, "test", size=15)) == 1
    assert len(SegmentationFolder(tmp_path, "train", size=15, num_images=2)) == 2


def test_cityscapes_folder_reads_train_ids_or_maps_label_ids(tmp_path):
    train_ids = np.full((16, 32), 255, dtype=np.uint8)
    train_ids[8:] = 13  # car
    label_ids = np.full((16, 32), 7, dtype=np.uint8)  # road -> 0
    label_ids[:, 16:] = 26  # car -> 13
    label_ids[:4] = 1  # ego vehicle -> ignored
    city = "aachen"
    _png(tmp_path / "leftImg8bit/train" / city / "a_000000_leftImg8bit.png", _rgb(0, 16, 32))
    _png(tmp_path / "gtFine/train" / city / "a_000000_gtFine_labelTrainIds.png", train_ids)
    _png(tmp_path / "leftImg8bit/train" / city / "a_000001_leftImg8bit.png", _rgb(1, 16, 32))
    _png(tmp_path / "gtFine/train" / city / "a_000001_gtFine_labelIds.png", label_ids)
    _png(tmp_path / "leftImg8bit/val" / city / "a_000002_leftImg8bit.png", _rgb(2, 16, 32))
    _png(tmp_path / "gtFine/val" / city / "a_000002_gtFine_labelTrainIds.png", train_ids)
    data = SegmentationFolder(tmp_path, "train", size=16)
    assert (len(data), data.num_classes, data.layout) == (2, 19, "cityscapes")
    first, second = data.read_mask(0), data.read_mask(1)
    assert (first[:8] == IGNORE).all() and (first[8:] == 13).all()
    assert (second[:4] == IGNORE).all()
    assert (second[4:, :8] == 0).all() and (second[4:, 8:] == 13).all()
    assert len(SegmentationFolder(tmp_path, "test", size=16)) == 1


def test_folder_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="neither an ADE20K folder"):
        SegmentationFolder(tmp_path, "train", size=32)
    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "annotations").mkdir()
    with pytest.raises(ValueError, match="no image/mask pairs"):
        SegmentationFolder(tmp_path, "train", size=32)
    with pytest.raises(ValueError, match="split must be"):
        SegmentationFolder(tmp_path, "val", size=32)
