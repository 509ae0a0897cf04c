"""Expansion: a batch of keys evaluated over the whole domain or under chosen tree nodes.

All nodes of a tree level, of all keys of a batch, go through one PRG call (`cryptography`'s
AES into a reused buffer), then a compiled kernel finishes the level for every node:
feed-forward, the control bit split off, the key's correction word applied where the parent's
control bit is set (branchless), and the children's tweaked inputs written for the next call.
The leaves' value blocks, most of the AES, go through that call plus `_finish_leaves`, or, on
CPUs with VAES, through `prg.value_blocks` (AES in registers, bit-identical). Bit x of an
expansion is bit (x & 63) of 64-bit word (x >> 6), the little-endian reading of the leaf blocks.

`expand` evaluates whole domains; a PIR server instead takes the seeds of the nodes at one
level (`node_seeds`) and evaluates the subtree under one node at a time (`expand_below`),
chunk by chunk along its pass over the table.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from types import FunctionType

import numba
import numpy as np

from fedge.privacy.dpf.keygen import gen
from fedge.privacy.dpf.keys import LEAF_BLOCKS, DPFKey, KeyBatch, leaf_blocks, tree_depth
from fedge.privacy.dpf.prg import (
    BRANCH,
    ROUND_KEYS,
    SEED_ONLY,
    T_VALUE,
    VAES,
    VALUE_TWEAKS,
    aes_encryptor,
    value_blocks,
)


def _correct_level(out, inp, t, cw_seed, cw_bits, next_inp, next_t, tweaks):
    """Finish one level for (keys, nodes): feed-forward, split off the control bits, apply the
    key's correction word where the parent's control bit is set (branchless), and write the
    children's tweaked AES inputs for the next call."""
    keys, nodes = t.shape
    width = next_inp.shape[2]
    for key in numba.prange(keys):
        cs0, cs1 = cw_seed[key, 0], cw_seed[key, 1]
        for i in range(nodes):
            mask = np.uint64(0) - t[key, i]
            for side in range(2):
                lo = out[key, i, side, 0] ^ inp[key, i, side, 0]
                hi = out[key, i, side, 1] ^ inp[key, i, side, 1]
                bit = lo & np.uint64(1)
                lo = (lo ^ bit) ^ (mask & cs0)
                hi = hi ^ (mask & cs1)
                c = 2 * i + side
                next_t[key, c] = bit ^ (mask & cw_bits[key, side])
                for w in range(width):
                    next_inp[key, c, w, 0] = lo ^ tweaks[w, 0]
                    next_inp[key, c, w, 1] = hi ^ tweaks[w, 1]


def _finish_leaves(out, inp, t, cw_out):
    """Leaf blocks: feed-forward of the value PRG, plus the output correction where t is set.
    out and inp are (keys, leaves * words) and cw_out (keys, words), words = 2 * leaf_blocks:
    flat rows, so each leaf's update is one run of contiguous words that LLVM vectorises."""
    keys, leaves = t.shape
    words = cw_out.shape[1]
    for key in numba.prange(keys):
        for i in range(leaves):
            mask = np.uint64(0) - t[key, i]
            base = i * words
            for w in range(words):
                out[key, base + w] ^= inp[key, base + w] ^ (mask & cw_out[key, w])


_values_4, _values_1 = value_blocks(4), value_blocks(1)


def _aes_leaves(out, seeds, t, cw_out, tweaks, rk):
    """Leaf blocks with AES in registers (VAES): what the AES call plus `_finish_leaves` make,
    without writing the tweaked inputs out and reading them back. out (keys, leaves * 2W),
    seeds (keys, leaves * 2), t (keys, leaves), cw_out (keys, 2W)."""
    keys, leaves = t.shape
    words = cw_out.shape[1]
    for key in numba.prange(keys):
        i = 0
        while i + 4 <= leaves:
            row = key * leaves + i
            _values_4(out, row * words, seeds, 2 * row, t, row, cw_out, key * words, tweaks, rk)
            i += 4
        while i < leaves:
            row = key * leaves + i
            _values_1(out, row * words, seeds, 2 * row, t, row, cw_out, key * words, tweaks, rk)
            i += 1


def serial_and_parallel(fn: Callable) -> dict[bool, Callable]:
    """Two compiled builds of a kernel, keyed by `parallel`: threads pay off only on big inputs,
    and on a shared machine a parallel region waits for its slowest thread. The serial build
    releases the GIL, so Python threads can run it side by side. The parallel build
    compiles a renamed copy, so the two builds get separate on-disk cache entries."""
    twin = FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_parallel")
    twin.__qualname__ = fn.__qualname__ + "_parallel"
    return {
        False: numba.njit(cache=True, nogil=True)(fn),
        True: numba.njit(parallel=True, cache=True)(twin),
    }


PARALLEL_MIN_NODES = 1 << 16  # tree nodes of a level below which one thread expands it
_LEVEL = serial_and_parallel(_correct_level)
_LEAVES = serial_and_parallel(_finish_leaves)
_AES_LEAVES = serial_and_parallel(_aes_leaves) if VAES else {}  # never compiled without VAES


EXPAND_BUFFER_BYTES = 256 << 20  # work space per group of keys expanded together


def expand(keys: KeyBatch | Sequence[DPFKey]) -> np.ndarray:
    """Full-domain evaluation of a batch of keys: (len(keys), words) uint64, bit x of key i is
    bit (x & 63) of word x >> 6 of row i. All keys go through one AES call per tree level (for
    huge domains, per group of keys that fits EXPAND_BUFFER_BYTES). A PIR server does not call
    this on big tables: it expands subtree by subtree along its pass (`expand_below`)."""
    batch = keys if isinstance(keys, KeyBatch) else KeyBatch.of(keys)
    per_key = 16 * leaf_blocks(batch.domain_bits) << tree_depth(batch.domain_bits)  # the leaves
    group = max(1, EXPAND_BUFFER_BYTES // per_key)
    if len(batch) > group:
        return np.concatenate(
            [_expand(batch.take(slice(lo, lo + group))) for lo in range(0, len(batch), group)]
        )
    return _expand(batch)


class Workspace:
    """Expansion buffers (two ping-pong level buffers and the AES output), grown on demand
    and reused: fresh pages cost more than the AES itself. One per thread."""

    def __init__(self) -> None:
        self.size = 0
        self.enc = aes_encryptor()

    def buffers(self, words: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The two level buffers and the AES output, at least `words` uint64 words each."""
        if words > self.size:
            self.size = words
            self.bufs = [np.empty(words, np.uint64) for _ in range(2)]
            self.aes_out = np.empty(words + 2, np.uint64)  # update_into wants 15 spare bytes
        return self.bufs, self.aes_out


_THREAD = threading.local()


def thread_workspace() -> Workspace:
    """This thread's Workspace, kept between calls: small passes (many tables, bins) would
    otherwise pay for a new AES context and fresh buffers each time."""
    if not hasattr(_THREAD, "work"):
        _THREAD.work = Workspace()
    return _THREAD.work


def _descend(batch, seeds, t, level, stop, work, parallel, leaf_tweaks=None):
    """Walk nodes (keys, m) at `level` down to level `stop` <= depth, one AES call per level
    for all keys and nodes. Returns the AES inputs of the nodes at `stop`, (keys, nodes,
    tweaks, 2) (tweaked for children, or at the depth with `leaf_tweaks`: by default the value
    tweaks, for the AES call of the leaf values; SEED_ONLY for the seeds themselves), and their
    control bits (keys, nodes)."""
    depth, width = tree_depth(batch.domain_bits), leaf_blocks(batch.domain_bits)
    leaf_tweaks = T_VALUE[:width] if leaf_tweaks is None else leaf_tweaks
    k, m = t.shape
    per_node = 2 * width if stop == depth else 4  # words of AES input per node at `stop`
    bufs, aes_out = work.buffers(k * m * (per_node << (stop - level)))  # the widest level
    tweaks = BRANCH if level < depth else leaf_tweaks
    inp = bufs[0][: k * m * tweaks.size].reshape(k, m, -1, 2)
    np.bitwise_xor(seeds[:, :, None, :], tweaks, out=inp)
    for lvl in range(level, stop):
        out = aes_out[: inp.size].reshape(inp.shape)
        work.enc.update_into(inp.reshape(-1).view(np.uint8).data, aes_out.view(np.uint8).data)
        tweaks = leaf_tweaks if lvl == depth - 1 else BRANCH
        nodes = 2 * t.shape[1]
        nxt = bufs[(lvl - level + 1) % 2][: k * nodes * tweaks.size].reshape(k, nodes, -1, 2)
        nxt_t = np.empty((k, nodes), np.uint64)
        kernel = _LEVEL[t.size >= PARALLEL_MIN_NODES if parallel is None else parallel]
        kernel(out, inp, t, batch.cw_seed[lvl], batch.cw_bits[lvl], nxt, nxt_t, tweaks)
        inp, t = nxt, nxt_t
    return inp, t


def node_seeds(batch: KeyBatch, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeds (keys, 2^level, 2) and control bits (keys, 2^level) of every node at `level`
    (0..depth): the roots of subtrees that `expand_below` evaluates one at a time."""
    if not 0 <= level <= tree_depth(batch.domain_bits):
        raise ValueError(f"level must be in 0..{tree_depth(batch.domain_bits)}, got {level}")
    seeds, t = batch.seed[:, None, :], batch.party.reshape(-1, 1)
    if level == 0:
        return seeds, t
    inp, t = _descend(batch, seeds, t, 0, level, thread_workspace(), None, SEED_ONLY)
    first = BRANCH[0] if level < tree_depth(batch.domain_bits) else SEED_ONLY[0]
    return inp[:, :, 0, :] ^ first, t  # remove the tweak the AES input carries


def expand_below(
    batch: KeyBatch,
    seeds: np.ndarray,
    t: np.ndarray,
    level: int,
    work: Workspace | None = None,
    parallel: bool | None = None,
) -> np.ndarray:
    """Full evaluation of the subtrees under nodes (keys, m) at `level` (from `node_seeds`):
    (keys, m * 2^(depth - level + LEAF_BITS - 6)) uint64 words, i.e. the bits of those nodes'
    rows, laid out as in `expand`. `work` reuses buffers across calls (one Workspace per
    thread). A domain smaller than one leaf gets only its own ceil(2^n / 64) words, with the
    bits past its end cleared."""
    work = work or Workspace()
    bits = batch.domain_bits
    depth, width = tree_depth(bits), leaf_blocks(bits)
    fused = VAES and width == LEAF_BLOCKS  # a domain smaller than one leaf: a few blocks
    inp, t = _descend(batch, seeds, t, level, depth, work, parallel, SEED_ONLY if fused else None)
    _, aes_out = work.buffers(0)
    keys, threads = t.shape[0], t.size >= PARALLEL_MIN_NODES if parallel is None else parallel
    cw_out = np.ascontiguousarray(batch.cw_out.reshape(keys, -1))
    if fused:
        words = aes_out[: t.size * 2 * width].reshape(keys, -1)
        t = np.ascontiguousarray(t)
        _AES_LEAVES[threads](words, inp.reshape(keys, -1), t, cw_out, VALUE_TWEAKS, ROUND_KEYS)
    else:
        work.enc.update_into(inp.reshape(-1).view(np.uint8).data, aes_out.view(np.uint8).data)
        words = aes_out[: inp.size].reshape(keys, -1)
        _LEAVES[threads](words, inp.reshape(keys, -1), t, cw_out)
    if bits < 6:  # less than a word; one block: keep a word, contiguous as the kernels want
        words = words[:, :1] & np.uint64((1 << (1 << bits)) - 1)
    elif bits == 6:
        words = words[:, :1].copy()
    return words


def _expand(batch: KeyBatch, parallel: bool | None = None) -> np.ndarray:
    return expand_below(
        batch, batch.seed[:, None, :], batch.party.reshape(-1, 1), 0, parallel=parallel
    )


def warm_up() -> None:
    """Compile (or load from numba's cache) the serial and parallel expansion kernels."""
    batch = KeyBatch.parse([gen(0, 9)[0].to_bytes()])
    for parallel in (False, True):
        _expand(batch, parallel)


def eval_all(key: DPFKey) -> np.ndarray:
    """This party's share of the whole truth table: 2^domain_bits bits as uint8 0/1."""
    words = expand([key])[0]
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    return bits[: 1 << key.domain_bits]
