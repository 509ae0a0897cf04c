"""The answer kernels: E @ T over GF(2) for one chunk of rows, compiled with numba.

Each kernel takes (table part, bits, acc, lo, hi): the queries' expanded bits for the chunk
(bit r of query q is bit (r & 63) of word r >> 6 of bits[q]) and XORs the selected rows lo..hi
into acc, for every row updating all queries (queries innermost), branchless.

On the "blocks" layout (CPUs with GFNI and AVX-512; the default there):

- affine: the table is stored once as 8x8 bit matrices (8 rows x one byte column each), and one
  GF2P8AFFINEQB multiplies 8 of them by 8 queries' bits at once: 8 queries x 8 rows x 64 bits
  per instruction, 8 instructions per 8 rows x 8 queries of 64-byte rows, accumulators in
  registers.

On the "rows" layout (any CPU):

- stream (1 query): acc ^= row & -bit(row) with acc in registers, at memory speed;
- gray (2+ queries, four Russians): all 16 XOR combinations of 4 rows are built once (15 row
  XORs, each combination from a smaller one), then each query adds the one its 4 bits select:
  (16 + Q) / 4 instead of Q row XORs per row, 3.6x fewer at Q = 128. Rows go in 64-byte slabs,
  one vector XOR each (numba intrinsics), and a query's 16 lookups of a 64-row block add up in
  a register. At 2 to 8 queries it is still memory-bound, like stream;
- mask: the plain form, acc[q] ^= row & -bit(q, row), one AND-XOR per query per row word: the
  last rows of a chunk, and the reference the benchmark compares with.

The intrinsics and their callers share this file: numba's cache checks only the file of the
function it compiles.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from fedge.privacy.simd import SLAB, check_c_arrays, host_has, slab_ptr, word_ptr

GRAY_MIN_QUERIES = 2  # one query streams the table with its accumulator in registers
_LOWEST_BIT = np.array([0, 0, 1, 0, 2, 0, 1, 0, 3, 0, 1, 0, 2, 0, 1, 0], np.int64)


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


@numba.njit(cache=True, nogil=True)
def answer_affine_pooled(pool, firsts, rows, bits, bounds, acc, qblocks):
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
