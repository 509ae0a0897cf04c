"""Two-server private information retrieval from DPF keys (Lam et al., ASPLOS 2024, section 3).

The client splits e_i into two DPF keys, one per non-colluding server. Each server expands its
key over the whole table and returns the XOR of the rows its share selects; the two answers XOR
to row i. Neither server alone learns anything about i.

A server answers a whole batch in one pass over the table: with the batch's expansions as a bit
matrix E (queries x rows), the answer is the GF(2) product E @ T. The expansion is chunked into
the pass: the table is cut into chunks of rows that are subtrees of the DPF tree, and a thread
expands every key's subtree for its chunk (up to 2 MiB of bits that stay in its L2 cache,
instead of queries x rows / 8 bytes written to memory and read back) and at once runs the
compiled kernel over the chunk's rows, for every row updating all queries (queries innermost),
branchless. Threads take chunks as they free up. The kernel depends on how the server holds the
table (`ServerTable`):

- affine, on the "blocks" layout (CPUs with GFNI and AVX-512; the default there): the table is
  stored once as 8x8 bit matrices (8 rows x one byte column each), and one GF2P8AFFINEQB
  multiplies 8 of them by 8 queries' bits at once: 8 queries x 8 rows x 64 bits per
  instruction, 8 instructions per 8 rows x 8 queries of 64-byte rows, accumulators in registers.

On the "rows" layout (any CPU):

- stream (1 query): acc ^= row & -bit(row) with acc in registers, at memory speed;
- gray (2+ queries, four Russians): all 16 XOR combinations of 4 rows are built once (15 row
  XORs, each combination from a smaller one), then each query adds the one its 4 bits select:
  (16 + Q) / 4 instead of Q row XORs per row, 3.6x fewer at Q = 128. Rows go in 64-byte slabs,
  one vector XOR each (numba intrinsics), and a query's 16 lookups of a 64-row block add up in
  a register. At 2 to 8 queries it is still memory-bound, like stream;
- mask: the plain form, acc[q] ^= row & -bit(q, row), one AND-XOR per query per row word: the
  last rows of a chunk, and the reference the benchmark compares with.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from fedge.privacy.dpf import (
    LEAF_BITS,
    DPFKey,
    KeyBatch,
    expand,
    expand_below,
    gen_batch,
    node_seeds,
    thread_workspace,
)
from fedge.privacy.dpf import warm_up as dpf_warm_up
from fedge.privacy.simd import SLAB, check_c_arrays, host_has, slab_ptr, word_ptr

GRAY_MIN_QUERIES = 2  # one query streams the table with its accumulator in registers
_LOWEST_BIT = np.array([0, 0, 1, 0, 2, 0, 1, 0, 3, 0, 1, 0, 2, 0, 1, 0], np.int64)


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


def query(indices: Sequence[int] | np.ndarray, num_rows: int) -> tuple[list[bytes], list[bytes]]:
    """Serialized DPF keys for server A and server B, one pair per requested row."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
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


def _answer_mask(table, bits, acc, lo, hi):
    """acc[q] ^= table[r] & -bit(q, r) for rows lo..hi: queries innermost, no branch on bits.
    Row words go through registers 8 at a time (a 64-byte slab), which LLVM vectorises."""
    queries, width = acc.shape[0], table.shape[1]
    cur = np.empty(queries, np.uint64)
    for base in range(lo, hi, 64):
        for q in range(queries):  # this block's 64 bits of every query, gathered once
            cur[q] = bits[q, base >> 6]
        for j in range(min(64, hi - base)):
            r, shift = base + j, np.uint64(j)
            for s in range(0, width - 7, 8):
                r0, r1, r2, r3 = table[r, s], table[r, s + 1], table[r, s + 2], table[r, s + 3]
                r4, r5, r6, r7 = table[r, s + 4], table[r, s + 5], table[r, s + 6], table[r, s + 7]
                for q in range(queries):
                    m = np.uint64(0) - ((cur[q] >> shift) & np.uint64(1))
                    acc[q, s] ^= r0 & m
                    acc[q, s + 1] ^= r1 & m
                    acc[q, s + 2] ^= r2 & m
                    acc[q, s + 3] ^= r3 & m
                    acc[q, s + 4] ^= r4 & m
                    acc[q, s + 5] ^= r5 & m
                    acc[q, s + 6] ^= r6 & m
                    acc[q, s + 7] ^= r7 & m
            for w in range(width - width % 8, width):
                x = table[r, w]
                for q in range(queries):
                    acc[q, w] ^= x & (np.uint64(0) - ((cur[q] >> shift) & np.uint64(1)))


def _answer_stream(table, bits, acc, lo, hi):
    """Queries one at a time: stream the rows with the accumulator in 8 registers (one 64-byte
    slab per pass), so a single query runs near memory speed (the mask loop keeps acc in
    memory). The `n > k` tests are loop-invariant: LLVM hoists them out of the row loop."""
    queries, width = acc.shape[0], table.shape[1]
    zero, one = np.uint64(0), np.uint64(1)
    for q in range(queries):
        for s in range(0, width, 8):
            n = min(8, width - s)
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero
            for base in range(lo, hi, 64):
                b = bits[q, base >> 6]
                for j in range(min(64, hi - base)):
                    r, m = base + j, zero - ((b >> np.uint64(j)) & one)
                    a0 ^= table[r, s] & m
                    if n > 1:
                        a1 ^= table[r, s + 1] & m
                    if n > 2:
                        a2 ^= table[r, s + 2] & m
                    if n > 3:
                        a3 ^= table[r, s + 3] & m
                    if n > 4:
                        a4 ^= table[r, s + 4] & m
                    if n > 5:
                        a5 ^= table[r, s + 5] & m
                    if n > 6:
                        a6 ^= table[r, s + 6] & m
                    if n > 7:
                        a7 ^= table[r, s + 7] & m
            for k, a in enumerate((a0, a1, a2, a3, a4, a5, a6, a7)):
                if k < n:
                    acc[q, s + k] ^= a


@intrinsic
def _xor_slab(typingctx, dst, d, a, i, b, j):
    """dst.flat[d : d+8] = a.flat[i : i+8] ^ b.flat[j : j+8], as one 512-bit vector XOR
    (numba leaves such 8-word loops scalar: it cannot prove the arrays do not overlap)."""
    check_c_arrays(dst, a, b)

    def codegen(context, builder, sig, args):
        x = builder.load(slab_ptr(context, builder, sig.args[2], args[2], args[3]), align=8)
        y = builder.load(slab_ptr(context, builder, sig.args[4], args[4], args[5]), align=8)
        builder.store(
            builder.xor(x, y), slab_ptr(context, builder, sig.args[0], args[0], args[1]), align=8
        )
        return context.get_dummy_value()

    return types.void(dst, d, a, i, b, j), codegen


@intrinsic
def _lookup_slabs(typingctx, acc, d, combos, word):
    """acc.flat[d : d+8] ^= the XOR over g < 16 of combos.flat[(16 g + c_g) * 8 :][:8],
    c_g = bits 4g..4g+3 of `word`: one 64-row block of one query, accumulated in a vector
    register, with acc loaded and stored once."""
    check_c_arrays(acc, combos)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        dst = slab_ptr(context, builder, sig.args[0], args[0], args[1])
        v = builder.load(dst, align=8)
        for g in range(16):
            c = builder.and_(builder.lshr(args[3], i64(4 * g)), i64(15))
            offset = builder.shl(builder.add(c, i64(16 * g)), i64(3))
            slab = slab_ptr(context, builder, sig.args[2], args[2], offset)
            v = builder.xor(v, builder.load(slab, align=8))
        builder.store(v, dst, align=8)
        return context.get_dummy_value()

    return types.void(acc, d, combos, types.uint64), codegen


def _answer_gray(table, bits, acc, lo, hi):
    """Four-Russians form for rows lo..hi (lo a multiple of 64), in 64-byte slabs of the row.
    Per 64-row block and slab: the 16 XOR combinations of each of its 16 groups of 4 rows (15
    slab XORs a group, each combination from a smaller one), then per query one lookup per
    group, 16 in a register. acc has a multiple of 8 columns: the lanes of a row's last slab
    past its width read the next rows and land in acc's padding, so the last rows of the table
    (whose overrun would leave the array) go through the mask loop."""
    queries, width, padded = acc.shape[0], table.shape[1], acc.shape[1]
    combos = np.zeros(16 * 16 * 8, np.uint64)
    safe = hi - -(-(padded - width) // width)  # rows whose last slab stays inside the table
    full = lo + max(safe - lo, 0) // 64 * 64
    for base in range(lo, full, 64):
        word = base >> 6
        for s in range(0, padded, 8):
            for g in range(16):
                block = g * 128
                for c in range(1, 16):
                    row = (base + 4 * g + _LOWEST_BIT[c]) * width + s
                    _xor_slab(combos, block + c * 8, combos, block + (c & (c - 1)) * 8, table, row)
            for q in range(queries):
                _lookup_slabs(acc, q * padded + s, combos, bits[q, word])
    _answer_mask_jit(table, bits, acc, full, hi)


_BYTES = ir.VectorType(ir.IntType(8), 64)
_GF2P8AFFINE = ir.FunctionType(_BYTES, [_BYTES, _BYTES, ir.IntType(8)])


# GF2P8AFFINEQB on 512-bit vectors (Ice Lake and later, Zen 4 and later): the "blocks" layout and
# its affine kernel; other CPUs keep the row layout and the stream/gray kernels.
AFFINE = host_has("gfni", "avx512f", "avx512bw")


def _affine_run(slabs: int):
    """An intrinsic that adds one 8-query block's products over `groups` 8-row groups into
    `slabs` 64-byte accumulators held in registers. Group g contributes, per slab, one
    GF2P8AFFINEQB of the 8 queries' bytes for the group (broadcast to the 8 lanes) with the
    group's 8 bit matrices (one per byte column): 8 queries x 8 rows x 64 bits per instruction."""

    @intrinsic
    def run(typingctx, acc, a, blocks, b, stride, xq, x, groups):
        check_c_arrays(acc, blocks, xq)

        def codegen(context, builder, sig, args):
            i64 = ir.IntType(64)
            acc_, a, blocks_, b, stride, xq_, x, groups = args
            affine = cgutils.get_or_insert_function(
                builder.module, _GF2P8AFFINE, "llvm.x86.vgf2p8affineqb.512"
            )
            dst = [
                slab_ptr(context, builder, sig.args[0], acc_, builder.add(a, i64(8 * s)))
                for s in range(slabs)
            ]
            regs = [cgutils.alloca_once_value(builder, builder.load(p, align=8)) for p in dst]
            with cgutils.for_range(builder, groups) as loop:
                g = loop.index
                word = builder.load(word_ptr(context, builder, sig.args[5], xq_, builder.add(x, g)))
                lanes = builder.insert_element(ir.Constant(SLAB, None), word, i64(0))
                zeros = ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8)
                lanes = builder.bitcast(builder.shuffle_vector(lanes, lanes, zeros), _BYTES)
                row = builder.add(b, builder.mul(g, stride))
                for s in range(slabs):
                    ptr = slab_ptr(
                        context, builder, sig.args[2], blocks_, builder.add(row, i64(8 * s))
                    )
                    matrices = builder.bitcast(builder.load(ptr, align=8), _BYTES)
                    y = builder.call(affine, [lanes, matrices, ir.IntType(8)(0)])
                    y = builder.xor(builder.load(regs[s]), builder.bitcast(y, SLAB))
                    builder.store(y, regs[s])
            for p, reg in zip(dst, regs, strict=True):
                builder.store(builder.load(reg), p, align=8)
            return context.get_dummy_value()

        sig = types.void(acc, a, blocks, b, stride, xq, x, groups)
        return sig, codegen

    return run


_affine_8, _affine_4, _affine_2, _affine_1 = (_affine_run(n) for n in (8, 4, 2, 1))


@intrinsic
def _transpose_bytes(typingctx, dst, d, src, s, stride):
    """dst.flat[d + g] byte j = src.flat[s + j * stride] byte g, for g, j < 8: 8 queries' words
    of one 64-row block become the 8 groups' query bytes the affine kernel broadcasts."""
    check_c_arrays(dst, src)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        dst_, d, src_, s, stride = args
        v = ir.Constant(SLAB, None)
        for j in range(8):
            at = builder.add(s, builder.mul(stride, i64(j)))
            word = builder.load(word_ptr(context, builder, sig.args[2], src_, at))
            v = builder.insert_element(v, word, i64(j))
        order = ir.Constant(
            ir.VectorType(ir.IntType(32), 64), [(o % 8) * 8 + o // 8 for o in range(64)]
        )
        v = builder.bitcast(v, _BYTES)
        v = builder.shuffle_vector(v, v, order)
        builder.store(
            builder.bitcast(v, SLAB), slab_ptr(context, builder, sig.args[0], dst_, d), align=8
        )
        return context.get_dummy_value()

    return types.void(dst, d, src, s, stride), codegen


AFFINE_TILE_BYTES = 32 << 10  # the blocks of one tile stay in L1 while all query blocks use them


def _answer_affine(blocks, bits, acc, lo, hi):
    """The bit-matrix product on the blocks layout, rows lo..hi (lo a multiple of 64): per tile
    of groups, the queries' bits are regrouped by 8-row group (8 queries' bytes per word), then
    each block of 8 queries runs the affine intrinsic over the tile, 8 slabs at a time.
    acc is (query blocks, width, 8): word (k, l) of a block holds byte 8k + l of its 8 answers."""
    queries, words, width = bits.shape[0], bits.shape[1], blocks.shape[1]
    tile = max(8, AFFINE_TILE_BYTES // (64 * width) // 8 * 8)
    xq = np.zeros(acc.shape[0] * tile, np.uint64)
    end = (hi + 7) // 8
    for t0 in range(lo // 8, end, tile):
        n = min(tile, end - t0)
        for qb in range(acc.shape[0]):
            q0 = 8 * qb
            for w in range((n + 7) // 8):
                col = t0 // 8 + w
                if q0 + 8 <= queries:
                    _transpose_bytes(xq, qb * tile + 8 * w, bits, q0 * words + col, words)
                else:  # the last, partial block of queries
                    for g in range(8):
                        x = np.uint64(0)
                        for j in range(queries - q0):
                            byte = (bits[q0 + j, col] >> np.uint64(8 * g)) & np.uint64(255)
                            x |= byte << np.uint64(8 * j)
                        xq[qb * tile + 8 * w + g] = x
        for qb in range(acc.shape[0]):
            s = 0
            while s < width:
                a, b = (qb * width + s) * 8, (t0 * width + s) * 8
                if width - s >= 8:
                    _affine_8(acc, a, blocks, b, width * 8, xq, qb * tile, n)
                    s += 8
                elif width - s >= 4:
                    _affine_4(acc, a, blocks, b, width * 8, xq, qb * tile, n)
                    s += 4
                elif width - s >= 2:
                    _affine_2(acc, a, blocks, b, width * 8, xq, qb * tile, n)
                    s += 2
                else:
                    _affine_1(acc, a, blocks, b, width * 8, xq, qb * tile, n)
                    s += 1


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


@numba.njit(cache=True, nogil=True)
def _answer_affine_pooled(pool, firsts, rows, bits, bounds, acc, qblocks):
    """The affine kernel for many tables that share one blocks buffer (`ServerTable.many`),
    in one call: table i is groups firsts[i].. of `pool`, answers keys bounds[i]..bounds[i+1]
    of `bits` into query blocks qblocks[i]..qblocks[i+1] of `acc`."""
    for i in range(firsts.shape[0]):
        groups = pool[firsts[i] : firsts[i] + (rows[i] + 7) // 8]
        keys, blocks = bits[bounds[i] : bounds[i + 1]], acc[qblocks[i] : qblocks[i + 1]]
        _answer_affine_jit(groups, keys, blocks, 0, rows[i])


_answer_mask_jit = numba.njit(cache=True, nogil=True)(_answer_mask)
_answer_gray_jit = numba.njit(cache=True, nogil=True)(_answer_gray)
_answer_stream_jit = numba.njit(cache=True, nogil=True)(_answer_stream)
_answer_affine_jit = numba.njit(cache=True, nogil=True)(_answer_affine)
KERNELS = {"stream": _answer_stream_jit, "mask": _answer_mask_jit, "gray": _answer_gray_jit}
if AFFINE:  # never compiled elsewhere: LLVM cannot emit GF2P8AFFINEQB without GFNI
    KERNELS["affine"] = _answer_affine_jit
LAYOUT_KERNELS = {"rows": ("stream", "mask", "gray"), "blocks": ("affine",)}
PARALLEL_MIN_WORK = 1 << 21  # pass_work below which one thread answers (about 2 ms of it)
CHUNK_BITS = 1 << 24  # expanded bits (queries x rows) per chunk: 2 MiB, an L2 cache
CHUNKS_PER_THREAD = 4  # at least, so a thread slowed by other jobs does not hold up the pass


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="pir-pass")


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
    out: list[np.ndarray | None] = [None] * len(servers)
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
        party = [-1 if servers[i].party is None else servers[i].party for i in members]
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
    return out


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
    _answer_affine_pooled(tables[0].pool, firsts, rows, bits, bounds, acc, qblocks)
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
        return KeyBatch.of(keys)
    return KeyBatch.parse(keys)


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


class TorchAnswerer:
    """The answer step in torch (for CUDA): the GF(2) product as an integer one. Over a block of
    rows, the queries' bits E (queries x rows, 0/1 int8) times the rows' bits T (rows x row bits,
    0/1 int8) with int32 sums (`torch._int_mm`: int8 tensor cores on a GPU); the parity of a
    sum is the XOR of the selected bits, so the answer is exact. The table stays packed on the
    device (its own size) and each block's bits are unpacked on the fly, so a block needs
    block_bytes of scratch memory whatever the table size."""

    def __init__(self, words: np.ndarray, device: str, block_bytes: int = 1 << 28):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.rows = words.shape[0]
        self.block_bytes = block_bytes
        padded = -(-self.rows // 64) * 64  # whole words of the queries' bits
        t = torch.zeros((padded, words.shape[1]), dtype=torch.int64)
        t[: self.rows] = torch.from_numpy(words.view(np.int64))
        self.table = t.to(self.device)
        self.shifts = torch.arange(64, dtype=torch.int64, device=self.device)

    def _bits(self, words):
        """(n, w) int64 words -> (n, 64 w) int8 bits, bit j of word i at column 64 i + j."""
        bits = (words[:, :, None] >> self.shifts) & 1
        return bits.to(self.torch.int8).reshape(words.shape[0], -1)

    def __call__(self, bits: np.ndarray) -> np.ndarray:
        torch = self.torch
        q, width = bits.shape[0], self.table.shape[1]
        e = torch.from_numpy(np.ascontiguousarray(bits).view(np.int64)).to(self.device)
        e = torch.cat([e, e.new_zeros((max(17 - q, 0), e.shape[1]))])  # _int_mm wants > 16
        per_row = 64 * width + e.shape[0]  # bytes of unpacked bits per table row in a block
        block = max(64, self.block_bytes // per_row // 64 * 64)
        sums = torch.zeros((e.shape[0], 64 * width), dtype=torch.int32, device=self.device)
        for lo in range(0, self.table.shape[0], block):
            rows = self._bits(self.table[lo : lo + block])
            queries = self._bits(e[:, lo // 64 : lo // 64 + rows.shape[0] // 64])
            sums += torch._int_mm(queries, rows)
        parity = (sums[:q] & 1).to(torch.int64).reshape(q, width, 64)
        answers = (parity << self.shifts).sum(dim=2)  # distinct bits: the sum is their OR
        return answers.cpu().numpy().view(np.uint64)
