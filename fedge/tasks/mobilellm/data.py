"""Local text for on-device language modelling, cut into fixed-length byte windows.

By default the text is the standard library's `pydoc_data.topics` (Python's own reference
pages: always installed, no download); otherwise every *.txt / *.md file under a folder.
Documents, in sorted order, are gathered into contiguous groups of about equal size; a
group of related topics per client is the natural non-IID split. Each group's last
`test_fraction` of text is held out, so the test set covers every group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SEPARATOR = "\n\n"


def pydoc_topics() -> dict[str, str]:
    """Python's reference topics, name -> text."""
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def read_text_dir(path: str | Path) -> dict[str, str]:
    """Every *.txt and *.md file under `path`, relative name -> text."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {root} is not a folder of text files")
    files = sorted(p for p in root.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.txt or *.md files under {root}")
    return {str(p.relative_to(root)): p.read_text("utf-8", errors="replace") for p in files}


class ByteTokenizer:
    """UTF-8 bytes as tokens: a 256-symbol vocabulary that needs no training and no files."""

    vocab_size = 256

    def encode(self, text: str) -> Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decode(self, tokens: Tensor) -> str:
        return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def group_documents(docs: dict[str, str], num_groups: int) -> list[list[str]]:
    """Split documents, in order, into up to `num_groups` contiguous groups of about equal
    size: a document goes to the group its midpoint falls in."""
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    sizes = np.array([len(t) for t in docs.values()], dtype=np.float64)
    mid = np.cumsum(sizes) - sizes / 2
    gid = np.minimum((mid * num_groups / sizes.sum()).astype(int), num_groups - 1)
    groups: dict[int, list[str]] = {}
    for g, name in zip(gid, docs, strict=True):
        groups.setdefault(int(g), []).append(name)
    return [groups[g] for g in sorted(groups)]


def windows(tokens: Tensor, seq_len: int) -> Tensor:
    """(N, seq_len + 1) non-overlapping windows: inputs are [:, :-1], targets [:, 1:]."""
    if len(tokens) < seq_len + 1:
        return torch.empty(0, seq_len + 1, dtype=torch.long)
    return tokens.unfold(0, seq_len + 1, seq_len)


@dataclass
class TextCorpus:
    """Train and test windows, each train window's group, and the groups' document names."""

    train: Tensor
    train_group: np.ndarray
    test: Tensor
    groups: list[list[str]]


def build_corpus(
    docs: dict[str, str], num_groups: int, seq_len: int, test_fraction: float = 0.1
) -> TextCorpus:
    tok = ByteTokenizer()
    groups = group_documents(docs, num_groups)
    train, test, gid = [], [], []
    for g, names in enumerate(groups):
        tokens = tok.encode(SEPARATOR.join(docs[n] for n in names))
        cut = int(len(tokens) * (1 - test_fraction))
        w = windows(tokens[:cut], seq_len)
        train.append(w)
        test.append(windows(tokens[cut:], seq_len))
        gid.append(np.full(len(w), g, dtype=np.int64))
    corpus = TextCorpus(torch.cat(train), np.concatenate(gid), torch.cat(test), groups)
    if len(corpus.train) == 0 or len(corpus.test) == 0:
        raise ValueError(
            f"text too short for seq_len {seq_len}: {len(corpus.train)} train and "
            f"{len(corpus.test)} test windows; lower seq_len or add text"
        )
    return corpus
