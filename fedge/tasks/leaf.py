"""LEAF's federated datasets (Caldas et al. 2018) read from their JSON files.

`--data-dir` holds LEAF's `train/` and `test/` folders (what LEAF's `preprocess.sh` writes),
each with one or more `*.json` files of the form
`{"users": [u, ...], "num_samples": [n, ...], "user_data": {u: {"x": [...], "y": [...]}}}`.
A LEAF user is a natural group: `--partition natural` deals users to clients (one user per
client when `--num-clients` equals the number of users); the server tests on `test/`.

- femnist: x is 784 pixel values in [0, 1] (a 28x28 image), y one of 62 classes; the digits
  task's CNN with 62 outputs.
- shakespeare: x an 80-character string, y the next character; an embedding and an LSTM over
  LEAF's 80-letter alphabet.
- sent140: x a tweet record `[id, date, query, user, text]`, y 0 or 1; a linear model on
  hashed bag-of-words counts of the text.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedge.tasks.base import Task, classification_sums
from fedge.tasks.digits import SmallCNN

# LEAF's Shakespeare alphabet (its `language_utils.ALL_LETTERS`): index = class
LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
HASH_BUCKETS = 4096  # sent140: hashed vocabulary size


def read_leaf_split(folder: Path) -> tuple[list[Any], list[Any], np.ndarray]:
    """(x, y, user index per sample) of every `*.json` file in `folder`, users in file order."""
    files = sorted(folder.glob("*.json"))
    if not files:
        raise ValueError(f"{folder}: no LEAF *.json files; expected LEAF's train/ and test/")
    xs: list[Any] = []
    ys: list[Any] = []
    groups: list[int] = []
    users: dict[str, int] = {}
    for path in files:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        missing = [k for k in ("users", "user_data") if k not in data]
        if missing:
            raise ValueError(f"{path}: not a LEAF file, missing {missing}")
        for user in data["users"]:
            record = data["user_data"].get(user)
            if record is None or "x" not in record or "y" not in record:
                raise ValueError(f"{path}: user {user!r} has no user_data with x and y")
            if len(record["x"]) != len(record["y"]):
                raise ValueError(
                    f"{path}: user {user!r} has {len(record['x'])} x but {len(record['y'])} y"
                )
            index = users.setdefault(user, len(users))
            xs += record["x"]
            ys += record["y"]
            groups += [index] * len(record["y"])
    return xs, ys, np.asarray(groups, dtype=np.int64)


class LeafTask(Task):
    """A LEAF dataset: the train split is the pool, grouped by user; `test/` is the server's."""

    def __init__(self, data_dir: str | None = None, seed: int = 0, **options: Any) -> None:
        super().__init__(data_dir, seed, **options)
        if not data_dir:
            raise ValueError(f"{self.name} reads LEAF's JSON files: pass --data-dir")
        root = Path(data_dir)
        x, y, self.groups = read_leaf_split(root / "train")
        self.train_split = self.encode(x, y)
        x, y, _ = read_leaf_split(root / "test")
        self.test_split = self.encode(x, y)

    def encode(self, x: list[Any], y: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensors of a split's samples and labels."""
        raise NotImplementedError

    def train_labels(self) -> np.ndarray:
        return self.train_split[1].numpy()

    def train_groups(self) -> np.ndarray:
        return self.groups

    def train_dataset(self, indices: np.ndarray | None = None) -> Dataset:
        x, y = self.train_split
        if indices is not None:
            idx = torch.as_tensor(indices, dtype=torch.long)
            x, y = x[idx], y[idx]
        return TensorDataset(x, y)

    def test_dataset(self) -> Dataset:
        return TensorDataset(*self.test_split)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def eval_sums(self, model: nn.Module, batch: Any) -> dict[str, float]:
        x, y = batch
        return classification_sums(model(x), y)


def _labels(y: list[Any], classes: int, name: str) -> torch.Tensor:
    labels = torch.tensor([int(v) for v in y], dtype=torch.long)
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"{name} labels must be in 0..{classes - 1}, found {labels.max()}")
    return labels


class FemnistTask(LeafTask):
    """FEMNIST: 62-class handwritten characters, one LEAF user per writer."""

    name = "femnist"

    def encode(self, x: list[Any], y: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.tensor(x, dtype=torch.float32)
        if images.ndim != 2 or images.shape[1] != 784:
            raise ValueError(f"femnist x must be 784 pixel values each, got {tuple(images.shape)}")
        return images.view(-1, 1, 28, 28), _labels(y, 62, "femnist")

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return SmallCNN(num_classes=62)


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model, smaller: an embedding, one LSTM layer, the next letter."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(len(LETTERS), 8)
        self.lstm = nn.LSTM(8, hidden, batch_first=True)
        self.out = nn.Linear(hidden, len(LETTERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(x))
        return self.out(h[:, -1])


def _letters(text: str) -> list[int]:
    return [max(LETTERS.find(c), 0) for c in text]  # LEAF maps unknown letters to 0 too


class ShakespeareTask(LeafTask):
    """Shakespeare: next-character prediction, one LEAF user per speaking role."""

    name = "shakespeare"

    def encode(self, x: list[Any], y: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = {len(s) for s in x}
        if len(lengths) > 1:
            raise ValueError(f"shakespeare x must be strings of one length, got {sorted(lengths)}")
        seqs = torch.tensor([_letters(s) for s in x], dtype=torch.long)
        return seqs, torch.tensor([_letters(c)[0] for c in y], dtype=torch.long)

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return CharLSTM()


def bag_of_words(text: str) -> np.ndarray:
    """Counts of the lower-cased words of `text` in HASH_BUCKETS buckets (crc32 hashing)."""
    counts = np.zeros(HASH_BUCKETS, dtype=np.float32)
    for word in text.lower().split():
        counts[zlib.crc32(word.encode()) % HASH_BUCKETS] += 1
    return counts


class Sent140Task(LeafTask):
    """Sent140: tweet sentiment (0 negative, 1 positive), one LEAF user per Twitter user."""

    name = "sent140"

    def encode(self, x: list[Any], y: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [r[4] if isinstance(r, list) and len(r) > 4 else r for r in x]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("sent140 x must be LEAF tweet records [id, date, query, user, text]")
        features = (
            np.stack([bag_of_words(t) for t in texts]) if texts else np.zeros((0, HASH_BUCKETS))
        )
        return torch.from_numpy(features.astype(np.float32)), _labels(y, 2, "sent140")

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return nn.Linear(HASH_BUCKETS, 2)
