import gzip
import struct

import numpy as np
import pytest

from fedge.errors import ConfigError
from fedge.tasks import TrainConfig, build_task
from fedge.tasks.digits import read_idx


def write_idx(path, array):
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def make_mnist_dir(root, n_train=60, n_test=20, seed=0, classes=10):
    """MNIST IDX files of `classes` digits (0..classes-1) a small model can learn."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % classes
        images = rng.integers(0, 30, (n, 28, 28), dtype=np.uint8)
        for i, y in enumerate(labels):  # a bright bar whose row encodes the digit
            images[i, 2 + 2 * y : 4 + 2 * y, 4:24] = 255
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def test_idx_loader_reads_what_was_written(tmp_path):
    make_mnist_dir(tmp_path)
    task = build_task("digits", data_dir=str(tmp_path))
    assert len(task.train_dataset()) == 60 and len(task.test_dataset()) == 20
    assert task.train_labels().tolist() == (np.arange(60) % 10).tolist()
    x, _ = task.train_dataset()[0]
    assert tuple(x.shape) == (1, 28, 28)


def test_idx_loader_learns_from_local_files(tmp_path):
    make_mnist_dir(tmp_path, n_train=200, n_test=50)
    task = build_task("digits", data_dir=str(tmp_path))
    model = task.build_model()
    task.train(
        model, task.train_dataset(), TrainConfig(epochs=8, batch_size=16, lr=0.05, momentum=0.9)
    )
    assert task.evaluate(model, task.test_dataset())["accuracy"] >= 0.9


def test_idx_errors_are_clear(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(bad)
    short = tmp_path / "short-idx"
    short.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short)
    with pytest.raises(FileNotFoundError, match="MNIST IDX files"):
        build_task("digits", data_dir=str(tmp_path / "empty"))
    cut = tmp_path / "cut-idx"
    cut.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 10))  # 3 dims, 1 given
    with pytest.raises(ValueError, match="IDX header cut short"):
        read_idx(cut)
    (tmp_path / "labels").mkdir()
    labels = make_mnist_dir(tmp_path / "labels") / "train-labels-idx1-ubyte"
    write_idx(labels, np.full(60, 226))
    with pytest.raises(ConfigError, match="labels must be digits 0-9, found 226"):
        build_task("digits", data_dir=str(tmp_path / "labels"))


def test_bundled_mnist_subset_trains_above_chance():
    task = build_task("digits")
    assert len(task.train_labels()) == 4000 and len(task.test_dataset()) == 1000
    assert set(task.train_labels().tolist()) == set(range(10))
    model = task.build_model()
    report = task.train(
        model,
        task.train_dataset(np.arange(1500)),
        TrainConfig(epochs=2, batch_size=16, momentum=0.9),
    )
    assert report.num_examples == 3000 and report.steps == 2 * 94
    assert task.evaluate(model, task.test_dataset())["accuracy"] > 0.7


def test_sklearn_source_and_unknown_option():
    task = build_task("digits", source="sklearn")
    x, _ = task.test_dataset()[0]
    assert tuple(x.shape) == (1, 8, 8)
    with pytest.raises(ValueError, match="unknown options"):
        build_task("digits", colour="red")


def test_time_budget_stops_training_early():
    task = build_task("digits")
    report = task.train(
        task.build_model(), task.train_dataset(), TrainConfig(epochs=5, max_seconds=0.2)
    )
    assert report.stopped_early and report.num_examples < 5 * 4000 and report.seconds < 2
