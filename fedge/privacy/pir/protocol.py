"""The PIR protocol (Lam et al., ASPLOS 2024, section 3): what the client sends and gets back.

The client splits e_i into two DPF keys, one per non-colluding server (`query`). Each server
XORs the rows its key's expansion selects and returns that (queries, words) uint64 answer; the
two answers XOR to row i (`reconstruct`). Rows travel as uint64 words: each row's bytes padded
with zeros to a multiple of 8 (`as_words`), and the keys cover the next power of two of rows
(`domain_bits_for`). Neither server alone learns anything about i.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedge.privacy.dpf import gen_batch


def domain_bits_for(num_rows: int) -> int:
    """Smallest DPF domain that covers num_rows (the table is padded to it with zero rows)."""
    if num_rows < 1:
        raise ValueError(f"a PIR table needs at least one row, got {num_rows}")
    return max(1, math.ceil(math.log2(num_rows)))


@dataclass(frozen=True)
class TableSpec:
    """What a client needs to turn answers back into rows."""

    num_rows: int
    dtype: np.dtype
    row_shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def words(self) -> int:
        """uint64 words per row, the row padded with zero bytes to a multiple of 8."""
        return max(1, -(-self.row_bytes // 8))

    @functools.cached_property
    def domain_bits(self) -> int:
        return domain_bits_for(self.num_rows)


def row_indices(indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """`indices` as a flat int64 array; a fractional, non-numeric or nested index is an error
    (a silent cast would fetch another row than the one asked for)."""
    raw = np.asarray(indices)
    if raw.ndim > 1:
        raise ValueError(
            f"row indices must be a flat sequence, got an array of shape {raw.shape}; "
            "flatten it first (ids.reshape(-1)) and reshape the rows that come back"
        )
    if raw.size and raw.dtype.kind not in "iu":
        try:
            as_float = raw.astype(np.float64)
        except (TypeError, ValueError):
            as_float = None
        fractional = [] if as_float is None else as_float[as_float != np.round(as_float)]
        if as_float is None or raw.dtype.kind != "f" or len(fractional):
            bad = fractional[0] if len(fractional) else raw.reshape(-1)[0]
            raise ValueError(f"row indices must be integers, got {bad.item()!r}")
    return raw.astype(np.int64).reshape(-1)


def query(indices: Sequence[int] | np.ndarray, num_rows: int) -> tuple[list[bytes], list[bytes]]:
    """Serialized DPF keys for server A and server B, one pair per requested row."""
    idx = row_indices(indices)
    if idx.size == 0:
        raise ValueError("query needs at least one row index")
    bad = idx[(idx < 0) | (idx >= num_rows)]
    if bad.size:
        raise IndexError(f"row index {int(bad[0])} out of range for a table of {num_rows} rows")
    keys_a, keys_b = gen_batch(idx, domain_bits_for(num_rows))
    return [k.to_bytes() for k in keys_a], [k.to_bytes() for k in keys_b]


def reconstruct(
    answers_a: np.ndarray, answers_b: np.ndarray, spec: TableSpec | None = None
) -> np.ndarray:
    """XOR the two servers' answers. With the table's spec, rows come back in its dtype and
    shape; without, as raw bytes (padding included)."""
    a, b = np.asarray(answers_a), np.asarray(answers_b)
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"answers disagree: {a.shape} {a.dtype} vs {b.shape} {b.dtype}")
    raw = np.ascontiguousarray(a ^ b).view(np.uint8).reshape(a.shape[0], -1)
    if spec is None:
        return raw
    if raw.shape[1] != spec.words * 8:
        raise ValueError(f"answers hold {raw.shape[1]} bytes per row, table rows {spec.words * 8}")
    rows = np.ascontiguousarray(raw[:, : spec.row_bytes]).view(spec.dtype)
    return rows.reshape(a.shape[0], *spec.row_shape)


def as_words(table: np.ndarray) -> np.ndarray:
    """The table as (rows, words) uint64, zero-padding each row to 8 bytes; no copy when the
    rows already are a multiple of 8 bytes."""
    table = np.ascontiguousarray(table)
    flat = table.reshape(table.shape[0], -1).view(np.uint8)
    pad = -flat.shape[1] % 8
    if flat.shape[1] == 0 or pad:
        flat = np.concatenate([flat, np.zeros((flat.shape[0], pad or 8), np.uint8)], axis=1)
    return flat.view(np.uint64)
