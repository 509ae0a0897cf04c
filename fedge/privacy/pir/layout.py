"""How a server holds its table, and how one pass over it is cut into chunks.

Layouts: "rows", the (rows, width) uint64 words as given (no copy), for the stream, mask and
gray kernels (any CPU); "blocks", (ceil(rows / 8), width, 8) uint64 8x8 bit matrices, one per
8 rows x byte column (`blocks_layout`, a copy built in parallel), for the affine kernel (CPUs
with GFNI and AVX-512).

Pass planning (`plan_pass`): the expansion is chunked into the pass. The table is cut into
chunks of rows that are subtrees of the DPF tree, about CHUNK_BITS expanded bits each (2 MiB,
kept in a thread's L2 cache instead of queries x rows / 8 bytes written to memory and read
back); threads take chunks as they free up, and passes too small to pay for threads
(`pass_work`) run on one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from fedge.privacy.dpf import LEAF_BITS

LAYOUT_KERNELS = {"rows": ("stream", "mask", "gray"), "blocks": ("affine",)}


@numba.njit(cache=True, inline="always")
def _transpose8x8(x):
    """Bit (8r + i) to bit (8i + r) of a word: an 8x8 bit matrix, row r in byte r, transposed."""
    t = (x ^ (x >> np.uint64(7))) & np.uint64(0x00AA00AA00AA00AA)
    x = x ^ t ^ (t << np.uint64(7))
    t = (x ^ (x >> np.uint64(14))) & np.uint64(0x0000CCCC0000CCCC)
    x = x ^ t ^ (t << np.uint64(14))
    t = (x ^ (x >> np.uint64(28))) & np.uint64(0x00000000F0F0F0F0)
    return x ^ t ^ (t << np.uint64(28))


@numba.njit(parallel=True, cache=True)
def _fill_blocks(raw, out):
    """out[g, c]: the matrix of byte column c of rows 8g..8g+7 in GF2P8AFFINEQB's order (byte
    7 - i holds bit i of the 8 rows, row r in bit r); rows past the end count as zeros."""
    rows, columns = raw.shape
    for g in numba.prange(out.shape[0]):
        n = min(8, rows - 8 * g)
        for c in range(columns):
            m = np.uint64(0)
            for r in range(n):
                m |= np.uint64(raw[8 * g + r, c]) << np.uint64(8 * r)
            t = _transpose8x8(m)
            d = np.uint64(0)
            for i in range(8):
                d |= ((t >> np.uint64(8 * i)) & np.uint64(255)) << np.uint64(8 * (7 - i))
            out[g, c] = d


def blocks_layout(words: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The table (rows, width) uint64 as the affine kernel reads it: (ceil(rows / 8), width, 8)
    uint64, one 8x8 bit matrix per 8-row group and byte column (a copy, built in parallel;
    into `out`, (ceil(rows / 8), width * 8) uint64, if given)."""
    rows, width = words.shape
    out = np.empty((-(-rows // 8), width * 8), np.uint64) if out is None else out
    _fill_blocks(np.ascontiguousarray(words).view(np.uint8).reshape(rows, width * 8), out)
    return out.reshape(-1, width, 8)


PARALLEL_MIN_WORK = 1 << 21  # pass_work below which one thread answers (about 2 ms of it)
CHUNK_BITS = 1 << 24  # expanded bits (queries x rows) per chunk: 2 MiB, an L2 cache
CHUNKS_PER_THREAD = 4  # at least, so a thread slowed by other jobs does not hold up the pass


@dataclass(frozen=True)
class PassPlan:
    """How one pass is cut: `count` chunks of `chunk` rows, chunk j being the rows under node
    j at `level` of the DPF tree, shared by `threads` threads."""

    level: int
    chunk: int
    count: int
    threads: int


def pass_work(rows: int, words: int, queries: int) -> float:
    """A pass's cost in table words read, about a nanosecond each: reading the table, plus the
    products, which on the vector kernels cost about as much as reading a word per 64 queries.
    Threads pay off only on passes of a few milliseconds (each costs a hand-off, its own
    expansion calls and a reduction), so small passes, e.g. a co-design's hot table and bins,
    run on one thread and leave the other core to the next request."""
    return rows * words * (1 + queries / 64)


def plan_pass(rows: int, words: int, queries: int, domain_bits: int) -> PassPlan:
    """Chunks of about CHUNK_BITS expanded bits (at least one leaf, 1024 rows), and at least
    CHUNKS_PER_THREAD per thread when the pass is big enough for threads."""
    parallel = rows >= 1 << 12 and pass_work(rows, words, queries) >= PARALLEL_MIN_WORK
    threads = numba.get_num_threads() if parallel else 1
    log_chunk = (CHUNK_BITS // queries).bit_length() - 1
    if threads > 1:
        log_chunk = min(log_chunk, int(math.log2(rows / (threads * CHUNKS_PER_THREAD))))
    log_chunk = min(domain_bits, max(log_chunk, LEAF_BITS))
    return PassPlan(domain_bits - log_chunk, 1 << log_chunk, -(-rows // (1 << log_chunk)), threads)
