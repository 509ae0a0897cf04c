"""One PIR server: the table in its layout (`ServerTable`), batched one-pass answers
(`answer_batch`, `answer_many`) and the server object (`PIRServer`).

A server answers a whole batch in one pass over the table: with the batch's expansions as a bit
matrix E (queries x rows), the answer is the GF(2) product E @ T. The pass is cut into chunks
(`layout.plan_pass`); a thread expands every key's subtree for its chunk (`dpf.expand_below`:
one AES call per level for the whole batch, buffers reused) and at once runs the layout's
kernel (`kernels`) over the chunk's rows. Threads take chunks as they free up; chunks past the
last row (the padding to a power of two) are never expanded.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import numpy as np

from fedge.privacy.dpf import DPFKey, KeyBatch, expand, expand_below, node_seeds, thread_workspace
from fedge.privacy.dpf import warm_up as dpf_warm_up
from fedge.privacy.pir.kernels import AFFINE, GRAY_MIN_QUERIES, KERNELS, answer_affine_pooled
from fedge.privacy.pir.layout import LAYOUT_KERNELS, blocks_layout, plan_pass
from fedge.privacy.pir.protocol import TableSpec, as_words
from fedge.privacy.pir.torch_backend import TorchAnswerer


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="pir-pass")


@dataclass(frozen=True)
class ServerTable:
    """The table as the CPU kernels read it. Layout "rows": (rows, width) uint64 words, for the
    stream, mask and gray kernels (any CPU). Layout "blocks": (ceil(rows / 8), width, 8) uint64
    bit matrices (`blocks_layout`), for the affine kernel (CPUs with GFNI and AVX-512)."""

    data: np.ndarray
    rows: int
    width: int  # uint64 words per row
    layout: str
    pool: np.ndarray | None = None  # the blocks buffer `data` is part of, when shared (`many`)
    first: int = 0  # and the 8-row group of `pool` where `data` starts

    @classmethod
    def of(cls, words: np.ndarray, layout: str = "auto") -> ServerTable:
        """Lay out (rows, width) words (see `resolve`). The rows layout keeps `words` itself
        (no copy)."""
        layout = cls.resolve(layout)
        data = blocks_layout(words) if layout == "blocks" else words
        return cls(data, words.shape[0], words.shape[1], layout)

    @staticmethod
    def resolve(layout: str) -> str:
        """The layout to use: "auto" takes "blocks" where the CPU has the affine kernel."""
        if layout == "auto":
            return "blocks" if AFFINE else "rows"
        if layout not in LAYOUT_KERNELS:
            raise ValueError(f"layout must be 'auto', 'rows' or 'blocks', got {layout!r}")
        if layout == "blocks" and not AFFINE:
            raise ValueError("the blocks layout needs a CPU with GFNI and AVX-512; use 'rows'")
        return layout

    @classmethod
    def many(cls, words: Sequence[np.ndarray], layout: str = "auto") -> list[ServerTable]:
        """Lay out many tables; in the blocks layout, the tables of each row width share one
        buffer, so `answer_many` runs the affine kernel over such a group in one call."""
        if cls.resolve(layout) != "blocks":
            return [cls.of(w, "rows") for w in words]
        tables: list[ServerTable] = [None] * len(words)  # type: ignore[list-item]
        by_width: dict[int, list[int]] = {}
        for i, w in enumerate(words):
            by_width.setdefault(w.shape[1], []).append(i)
        for width, members in by_width.items():
            groups = [-(-words[i].shape[0] // 8) for i in members]
            flat = np.empty((sum(groups), width * 8), np.uint64)
            pool, first = flat.reshape(-1, width, 8), 0
            for i, g in zip(members, groups, strict=True):
                data = blocks_layout(words[i], flat[first : first + g])
                tables[i] = cls(data, words[i].shape[0], width, "blocks", pool, first)
                first += g
        return tables

    def kernel(self, name: str, queries: int) -> str:
        """The kernel to run: "auto" picks this layout's best for the batch size."""
        if name == "auto":
            if self.layout == "blocks":
                return "affine"
            return "stream" if queries == 1 else "gray" if queries >= GRAY_MIN_QUERIES else "mask"
        if name not in LAYOUT_KERNELS[self.layout]:
            raise ValueError(
                f"kernel {name!r} does not read the {self.layout!r} layout (its kernels: "
                f"'auto', {', '.join(map(repr, LAYOUT_KERNELS[self.layout]))}); pick the "
                "layout when making the PIRServer"
            )
        return name

    def part(self, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi (lo a multiple of 8) as the kernels take them."""
        return self.data[lo // 8 : -(-hi // 8)] if self.layout == "blocks" else self.data[lo:hi]

    def accumulators(self, queries: int, kernel: str) -> np.ndarray:
        """Zeroed answers in the kernel's form: the gray kernel's rows are whole 64-byte slabs;
        the affine kernel's are blocks of 8 queries (see `_answer_affine`)."""
        if kernel == "affine":
            return np.zeros((-(-queries // 8), self.width, 8), np.uint64)
        return np.zeros(
            (queries, -(-self.width // 8) * 8 if kernel == "gray" else self.width), np.uint64
        )

    def answers(self, acc: np.ndarray, queries: int) -> np.ndarray:
        """(queries, width) uint64 answers from a kernel's accumulators."""
        if acc.ndim == 2:
            return acc[:, : self.width]
        by_query = acc.view(np.uint8).reshape(acc.shape[0], self.width, 8, 8).transpose(0, 3, 1, 2)
        rows = by_query.reshape(-1, self.width * 8)[:queries]
        return np.ascontiguousarray(rows).view(np.uint64)


def answer_batch(table: ServerTable, batch: KeyBatch, kernel: str = "auto") -> np.ndarray:
    """E @ T over GF(2): the keys' answers (queries, width) uint64.

    One pass, the expansion chunked into it (see `plan_pass`): a chunk's bits come from
    `expand_below` for all keys at once (one AES call per level), right before the kernel XORs
    its rows in. Chunks past the last row (the padding to a power of two) are never expanded."""
    queries = len(batch)
    kernel = table.kernel(kernel, queries)
    plan = plan_pass(table.rows, table.width, queries, batch.domain_bits)
    seeds, t = node_seeds(batch, plan.level)
    seeds, t = seeds.transpose(1, 0, 2).copy(), t.T.copy()  # by node: one chunk contiguous
    ids, fn, chunk = itertools.count(), KERNELS[kernel], plan.chunk

    def work() -> np.ndarray:
        acc, space = table.accumulators(queries, kernel), thread_workspace()
        while (j := next(ids)) < plan.count:  # itertools.count hands out each chunk once
            bits = expand_below(batch, seeds[j][:, None], t[j][:, None], plan.level, space, False)
            lo, hi = j * chunk, min((j + 1) * chunk, table.rows)
            fn(table.part(lo, hi), bits, acc, 0, hi - lo)
        return acc

    if plan.threads == 1:
        return table.answers(work(), queries)
    jobs = [_pool(plan.threads).submit(work) for _ in range(plan.threads)]
    return table.answers(np.bitwise_xor.reduce([job.result() for job in jobs]), queries)


def answer_many(servers: Sequence[PIRServer], keys: Sequence[Sequence[bytes]]) -> list[np.ndarray]:
    """[server.answer(k) for server, k in zip(servers, keys)], with the fixed cost of many small
    passes (a co-design's bins) paid once: the keys of small CPU tables of one domain size are
    decoded and expanded together (one AES call per tree level for all), then each table's
    kernel runs over its own rows for its own keys. Big tables get their own chunked pass."""
    if len(servers) != len(keys):
        raise ValueError(f"{len(servers)} servers but {len(keys)} key lists")
    out: dict[int, np.ndarray] = {}
    groups: dict[int, list[int]] = {}
    for i, (server, k) in enumerate(zip(servers, keys, strict=True)):
        table = server.table
        plan = plan_pass(table.rows, table.width, max(len(k), 1), server.spec.domain_bits)
        if server._torch is None and len(k) and plan.count == 1 and plan.threads == 1:
            groups.setdefault(server.spec.domain_bits, []).append(i)
        else:
            out[i] = server.answer(k)
    for domain_bits, members in groups.items():
        try:
            batch = as_batch([key for i in members for key in keys[i]])
            if batch.domain_bits != domain_bits:
                raise ValueError("keys for another domain")
        except ValueError:  # name the table and key: check each list on its own
            for i in members:
                servers[i].check(keys[i])
            raise
        counts = [len(keys[i]) for i in members]
        bounds = np.cumsum([0, *counts])
        party = [-1 if (p := servers[i].party) is None else p for i in members]
        wrong = np.repeat(party, counts)  # each table checks only what differs: its party
        wrong = (wrong >= 0) & (wrong != batch.party)
        if wrong.any():  # raises, naming the table's key
            i = members[int(np.searchsorted(bounds, np.argmax(wrong), "right")) - 1]
            servers[i].check(keys[i])
        seeds, t = batch.seed[:, None, :], batch.party.reshape(-1, 1)
        bits = expand_below(batch, seeds, t, 0, thread_workspace())  # used before the next call
        tables = [servers[i].table for i in members]
        pooled = tables[0].pool is not None and all(t.pool is tables[0].pool for t in tables)
        answers = (
            _pooled_answers(tables, bits, bounds)
            if pooled
            else _table_answers(tables, bits, bounds)
        )
        for i, answer in zip(members, answers, strict=True):
            out[i] = answer
    return [out[i] for i in range(len(servers))]


def _table_answers(
    tables: Sequence[ServerTable], bits: np.ndarray, bounds: np.ndarray
) -> list[np.ndarray]:
    """Each table's kernel over its rows for its keys (bits[bounds[i]:bounds[i + 1]])."""
    out = []
    for table, lo, hi in zip(tables, bounds[:-1], bounds[1:], strict=True):
        kernel = table.kernel("auto", hi - lo)
        acc = table.accumulators(hi - lo, kernel)
        KERNELS[kernel](table.part(0, table.rows), bits[lo:hi], acc, 0, table.rows)
        out.append(table.answers(acc, hi - lo))
    return out


def _pooled_answers(
    tables: Sequence[ServerTable], bits: np.ndarray, bounds: np.ndarray
) -> list[np.ndarray]:
    """What `_table_answers` returns, for tables sharing one blocks buffer: one compiled call."""
    counts = np.diff(bounds)
    qblocks = np.concatenate([[0], np.cumsum(-(-counts // 8))])
    acc = np.zeros((qblocks[-1], tables[0].width, 8), np.uint64)
    firsts = np.array([t.first for t in tables], np.int64)
    rows = np.array([t.rows for t in tables], np.int64)
    answer_affine_pooled(tables[0].pool, firsts, rows, bits, bounds, acc, qblocks)
    flat = tables[0].answers(acc, 8 * int(qblocks[-1]))
    return [flat[8 * qb : 8 * qb + n] for qb, n in zip(qblocks[:-1], counts, strict=True)]


def default_device() -> str:
    """ "cuda" when torch sees a GPU, else "cpu"; the FEDGE_PIR_DEVICE variable overrides."""
    choice = os.environ.get("FEDGE_PIR_DEVICE", "auto")
    if choice != "auto":
        return choice
    if not any(os.path.exists(d) for d in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")):
        return "cpu"  # no GPU device node: skip importing torch (seconds at server start)
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def warm_up() -> None:
    """Compile (or load from numba's cache) the expansion and every kernel, so that a
    server's first query does not pay for it."""
    dpf_warm_up()
    bits = np.zeros((9, 3), np.uint64)
    for layout, kernels in LAYOUT_KERNELS.items():
        if layout == "blocks" and not AFFINE:
            continue
        table = ServerTable.of(np.zeros((129, 1), np.uint64), layout)
        for kernel in kernels:
            KERNELS[kernel](table.part(0, 129), bits, table.accumulators(9, kernel), 0, 129)


def as_batch(keys: KeyBatch | Sequence[DPFKey | bytes]) -> KeyBatch:
    """Keys in any accepted form (a KeyBatch, DPFKey objects, or serialized bytes) as a batch."""
    if isinstance(keys, KeyBatch):
        return keys
    if keys and all(isinstance(k, DPFKey) for k in keys):
        return KeyBatch.of(cast(Sequence[DPFKey], keys))
    return KeyBatch.parse(cast(Sequence[bytes], keys))  # anything else fails there, by position


class PIRServer:
    """One of the two servers: holds the table, answers batches of DPF keys in one pass.

    device: "cpu" (the numba kernels), or a torch device such as "cuda" for the GPU path.
    party: if given, keys for the other party are refused (a client mixed up its servers).
    layout: how the CPU kernels hold the table (`ServerTable`): "auto" (blocks where the CPU
    has GFNI, else rows), "rows" or "blocks". The blocks layout is a copy: the server then
    holds its own table and the caller's array may be dropped.
    """

    def __init__(
        self,
        table: np.ndarray,
        party: int | None = None,
        device: str = "cpu",
        layout: str = "auto",
    ):
        table = np.asarray(table)
        if table.ndim == 0 or table.shape[0] == 0:
            raise ValueError(f"a PIR table needs at least one row, got shape {table.shape}")
        if table.dtype.hasobject:
            raise ValueError("a PIR table must hold plain numbers or bytes, not Python objects")
        self.spec = TableSpec(table.shape[0], table.dtype, tuple(table.shape[1:]))
        self.party = party
        self.device = device
        words = as_words(table)
        self._torch = None if device == "cpu" else TorchAnswerer(words, device)
        self.table = ServerTable.of(words, layout if self._torch is None else "rows")

    @classmethod
    def many(
        cls, tables: Sequence[np.ndarray], party: int | None = None, layout: str = "auto"
    ) -> list[PIRServer]:
        """CPU servers for many tables at once (a co-design's bins): in the blocks layout,
        tables of one row width share one buffer (`ServerTable.many`), and `answer_many` then
        answers a batch for all of them in one compiled call instead of one per table."""
        servers = [cls(t, party, layout="rows") for t in tables]  # checks; rows are views
        laid_out = ServerTable.many([s.table.data for s in servers], layout)
        for server, table in zip(servers, laid_out, strict=True):
            server.table = table
        return servers

    def check(self, keys: KeyBatch | Sequence[DPFKey | bytes]) -> KeyBatch:
        """Parse keys and make sure they fit this table and party; ValueError says why not."""
        batch = as_batch(keys)
        if batch.domain_bits != self.spec.domain_bits:
            raise ValueError(
                f"keys are for a 2^{batch.domain_bits} domain, this table of "
                f"{self.spec.num_rows} rows needs 2^{self.spec.domain_bits}"
            )
        if self.party is not None and (batch.party != self.party).any():
            i = int(np.flatnonzero(batch.party != self.party)[0])
            raise ValueError(f"key {i} is for party {1 - self.party}, this server is {self.party}")
        return batch

    def answer(self, keys: KeyBatch | Sequence[DPFKey | bytes], kernel: str = "auto") -> np.ndarray:
        """Answers (queries, words) uint64 for a batch of keys (see `as_batch`)."""
        batch = self.check(keys)
        if self._torch is not None:
            return self._torch(expand(batch))
        return answer_batch(self.table, batch, kernel)
