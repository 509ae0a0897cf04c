"""Distributed point function: Boyle-Gilboa-Ishai 2016 tree DPF over XOR shares.

`gen(alpha, n)` splits the point function f(x) = [x == alpha] on {0,1}^n into two keys; each key
alone is pseudorandom, and `eval_all(k0) ^ eval_all(k1)` is the unit vector e_alpha. Following
BGI-2016 (Fig. 1 with the early-termination optimisation):

- one correction word per tree level: a 128-bit seed correction and two control-bit corrections;
- early termination, widened: the tree stops LEAF_BITS = 7 + log2(W) levels early and each leaf
  converts its seed into W = LEAF_BLOCKS 128-bit output blocks, so a key is
  16 + 17*(n - LEAF_BITS) + 16*W bytes (plus a 5-byte header) and expansion touches
  L = 2^(n - LEAF_BITS) leaves: about 2L AES blocks for the tree and WL for the values, i.e.
  2^(n-7) * (1 + 2/W) blocks in all, against 3 * 2^(n-7) with one block per leaf (a domain
  smaller than one leaf is that one leaf with only the ceil(2^n / 128) blocks it needs,
  `leaf_blocks(n)`, so small tables keep keys of 21 + 16 * that bytes);
- the PRG is fixed-key AES-128 in Matyas-Meyer-Oseas form, G(s) = pi(s ^ c) ^ s ^ c with one public
  tweak c per output (left child, right child, and the W leaf values), so all nodes of a level, of
  all keys of a batch, go through ONE AES-ECB call on a preallocated buffer;
- on CPUs with VAES the leaf values (most of the AES) skip that call: a compiled loop runs the
  AES rounds itself, 4 blocks per 512-bit vector, and adds the feed-forward and the output
  correction in registers (`_aes_leaves`; bit-identical, and 2x cheaper at 1 GiB x 128 keys).

Seeds come from `secrets` (the OS CSPRNG). Bit x of an expansion is bit (x & 63) of 64-bit word
(x >> 6), the little-endian reading of the leaf blocks.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FunctionType

import numba
import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from fedge.privacy.simd import SLAB, check_c_arrays, host_has, slab_ptr, word_ptr

if sys.byteorder != "little":  # the uint64 views of AES blocks assume it
    raise ImportError("fedge.privacy.dpf needs a little-endian machine")

VERSION = 2  # 2: LEAF_BLOCKS output blocks per leaf (1: one block)
MAGIC = b"DP"
LEAF_BLOCKS = 8  # 128-bit output blocks per leaf (a power of two): fewer leaves, less AES
LEAF_BITS = 6 + LEAF_BLOCKS.bit_length()  # 7 + log2(LEAF_BLOCKS) domain bits per leaf
MAX_DOMAIN_BITS = 40
_HEADER = struct.Struct("<2sBBB")  # magic, version, party, domain_bits

# Public constants: the fixed AES key and the tweaks (left child, right child, LEAF_BLOCKS leaf
# values). The value tweaks share a hashed low word and count 1..W in the high word: distinct from
# each other and from the branch tweaks (whose high words are 0 and a hash word).
_AES_KEY = hashlib.sha256(b"fedge-dpf-v1 fixed-key AES").digest()[:16]
_RANDOM = np.frombuffer(hashlib.sha256(b"fedge-dpf-v1 tweaks").digest()[:24], np.uint64)
BRANCH = np.stack([np.zeros(2, np.uint64), _RANDOM[:2]])  # left child: s itself; right: s ^ c
T_VALUE = np.stack(  # (LEAF_BLOCKS, 2)
    [np.full(LEAF_BLOCKS, _RANDOM[2]), np.arange(1, LEAF_BLOCKS + 1, dtype=np.uint64)], axis=1
)
_ONE = np.uint64(1)


def tree_depth(domain_bits: int) -> int:
    """Levels of the seed tree; the last LEAF_BITS bits of the domain live in the leaf blocks."""
    return max(domain_bits - LEAF_BITS, 0)


def leaf_blocks(domain_bits: int) -> int:
    """Output blocks per leaf: LEAF_BLOCKS, or, for a domain smaller than one leaf, only the
    blocks its 2^n bits need (so small tables, e.g. co-design bins, keep small keys)."""
    return min(LEAF_BLOCKS, 1 << max(domain_bits - 7, 0))


def key_size(domain_bits: int) -> int:
    """Bytes of a serialized key: header, seed, per-level correction words, output correction."""
    return _HEADER.size + 16 + 17 * tree_depth(domain_bits) + 16 * leaf_blocks(domain_bits)


@dataclass(frozen=True)
class DPFKey:
    """One party's share: a root seed plus the public correction words (same in both keys)."""

    party: int
    domain_bits: int
    seed: np.ndarray  # (2,) uint64
    cw_seed: np.ndarray  # (depth, 2) uint64
    cw_bits: np.ndarray  # (depth, 2) uint64, control-bit corrections for (left, right)
    cw_out: np.ndarray  # (leaf_blocks(domain_bits), 2) uint64

    def to_bytes(self) -> bytes:
        head = _HEADER.pack(MAGIC, VERSION, self.party, self.domain_bits)
        bits = (self.cw_bits[:, 0] | (self.cw_bits[:, 1] << _ONE)).astype(np.uint8)
        return b"".join(
            [
                head,
                self.seed.tobytes(),
                self.cw_seed.tobytes(),
                bits.tobytes(),
                self.cw_out.tobytes(),
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> DPFKey:
        """Parse a key; raises ValueError naming the defect of a malformed or foreign key."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(f"a DPF key must be bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) < _HEADER.size:
            raise ValueError(
                f"DPF key too short: {len(data)} bytes, header alone is {_HEADER.size}"
            )
        magic, version, party, domain_bits = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ValueError(f"not a DPF key: magic {magic!r}, expected {MAGIC!r}")
        if version != VERSION:
            raise ValueError(
                f"DPF key version {version} unsupported; this build reads only version {VERSION} "
                f"({LEAF_BLOCKS} output blocks per leaf): the client must make new keys"
            )
        if party not in (0, 1):
            raise ValueError(f"DPF key party must be 0 or 1, got {party}")
        if not 1 <= domain_bits <= MAX_DOMAIN_BITS:
            raise ValueError(f"DPF key domain_bits {domain_bits} outside 1..{MAX_DOMAIN_BITS}")
        if len(data) != key_size(domain_bits):
            raise ValueError(
                f"DPF key for a 2^{domain_bits} domain must be {key_size(domain_bits)} bytes, "
                f"got {len(data)} (truncated or corrupted)"
            )
        depth = tree_depth(domain_bits)
        pos = _HEADER.size
        seed = np.frombuffer(data, np.uint64, 2, pos)
        pos += 16
        cw_seed = np.frombuffer(data, np.uint64, 2 * depth, pos).reshape(depth, 2)
        pos += 16 * depth
        bits = np.frombuffer(data, np.uint8, depth, pos)
        pos += depth
        if np.any(bits > 3):
            raise ValueError("DPF key control-bit corrections use only 2 bits per level; corrupted")
        cw_bits = np.stack([bits & 1, bits >> 1], axis=1).astype(np.uint64)
        width = leaf_blocks(domain_bits)
        cw_out = np.frombuffer(data, np.uint64, 2 * width, pos).reshape(width, 2)
        return cls(party, domain_bits, seed, cw_seed, cw_bits, cw_out)


def _aes(blocks: np.ndarray) -> np.ndarray:
    """Fixed-key AES-128 over every 16-byte block of a uint64 array: one ECB call."""
    flat = np.ascontiguousarray(blocks).reshape(-1)
    out = np.empty(flat.size + 2, np.uint64)  # update_into wants block_size - 1 spare bytes
    enc = Cipher(algorithms.AES(_AES_KEY), modes.ECB()).encryptor()
    enc.update_into(flat.view(np.uint8), out.view(np.uint8))
    return out[: flat.size].reshape(blocks.shape)


def _prg(seeds: np.ndarray, tweaks: np.ndarray) -> np.ndarray:
    """MMO PRG: seeds (..., 2) -> (..., len(tweaks), 2) blocks pi(s ^ c) ^ s ^ c."""
    x = seeds[..., None, :] ^ tweaks
    return _aes(x) ^ x


def gen_batch(alphas: np.ndarray, domain_bits: int) -> tuple[list[DPFKey], list[DPFKey]]:
    """Keys for many points at once (vectorised over points, one AES call per level)."""
    if not 1 <= domain_bits <= MAX_DOMAIN_BITS:
        raise ValueError(f"domain_bits must be in 1..{MAX_DOMAIN_BITS}, got {domain_bits}")
    alphas = np.asarray(alphas, np.int64).reshape(-1)
    if alphas.size and (alphas.min() < 0 or alphas.max() >= 1 << domain_bits):
        raise ValueError(
            f"alpha must be in [0, 2^{domain_bits}), got {alphas.min()}..{alphas.max()}"
        )
    k, depth = alphas.size, tree_depth(domain_bits)
    roots = np.frombuffer(secrets.token_bytes(32 * k), np.uint64).reshape(2, k, 2).copy()
    roots[..., 0] &= ~_ONE  # the control bit lives in bit 0 of a child block, so seeds drop it
    s = roots.copy()  # (party, key, 2)
    t = np.array([[0], [1]], np.uint64).repeat(k, axis=1)  # (party, key)
    cw_seed = np.empty((k, depth, 2), np.uint64)
    cw_bits = np.empty((k, depth, 2), np.uint64)
    leaf_bits = domain_bits - depth
    for level in range(depth):
        a = ((alphas >> (domain_bits - 1 - level)) & 1).astype(np.uint64)  # (key,)
        child = _prg(s, BRANCH)  # (party, key, side, 2)
        tc = child[..., 0] & _ONE
        child[..., 0] &= ~_ONE
        lose = 1 - a.astype(np.int64)
        rows = np.arange(k)
        cw_s = child[0, rows, lose] ^ child[1, rows, lose]
        cw_t = tc[0] ^ tc[1] ^ np.stack([a ^ _ONE, a], axis=1)
        keep = a.astype(np.int64)
        mask = (0 - t)[..., None]  # all-ones where the control bit is set
        s = child[:, rows, keep] ^ (mask & cw_s)
        t = tc[:, rows, keep] ^ (t & cw_t[rows, keep])
        cw_seed[:, level], cw_bits[:, level] = cw_s, cw_t
    width = leaf_blocks(domain_bits)
    conv = _prg(s, T_VALUE[:width])  # (party, key, width, 2)
    low = alphas & ((1 << leaf_bits) - 1)
    unit = np.zeros((k, width, 2), np.uint64)
    unit.reshape(k, -1)[np.arange(k), low >> 6] = _ONE << (low & 63).astype(np.uint64)
    cw_out = conv[0] ^ conv[1] ^ unit
    keys = tuple(
        [DPFKey(p, domain_bits, roots[p, i], cw_seed[i], cw_bits[i], cw_out[i]) for i in range(k)]
        for p in (0, 1)
    )
    return keys


def gen(alpha: int, domain_bits: int) -> tuple[DPFKey, DPFKey]:
    """Two keys whose expansions XOR to the unit vector at alpha in a 2^domain_bits domain."""
    k0, k1 = gen_batch(np.array([alpha]), domain_bits)
    return k0[0], k1[0]


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


def _sbox() -> list[int]:
    """The AES S-box (FIPS-197 5.1.1): inverse in GF(2^8), then the affine map."""
    exp, x = [], 1
    for _ in range(255):  # powers of the generator 3
        exp.append(x)
        x ^= (x << 1) ^ (0x11B if x & 0x80 else 0)
    log = {v: i for i, v in enumerate(exp)}
    box = []
    for b in range(256):
        inv = exp[-log[b] % 255] if b else 0
        box.append(inv ^ 0x63)
        for k in range(1, 5):
            box[-1] ^= ((inv << k) | (inv >> (8 - k))) & 0xFF
    return box


def round_keys(key: bytes) -> np.ndarray:
    """AES-128 key schedule (FIPS-197 5.2): the 11 round keys as (11, 2) uint64, for the
    expansion that runs AES itself (VAES) instead of through `cryptography`."""
    box, words, rcon = _sbox(), [list(key[i : i + 4]) for i in range(0, 16, 4)], 1
    for i in range(4, 44):
        temp = list(words[i - 1])
        if i % 4 == 0:
            temp = [box[b] for b in temp[1:] + temp[:1]]
            temp[0] ^= rcon
            rcon = (rcon << 1) ^ (0x11B if rcon & 0x80 else 0)
        words.append([a ^ b for a, b in zip(words[i - 4], temp, strict=True)])
    return np.frombuffer(bytes(sum(words, [])), np.uint64).reshape(11, 2).copy()


# VAES (AES rounds on 512-bit vectors, Ice Lake and later, Zen 4 and later): leaf values are
# computed whole in registers; elsewhere they go through `cryptography` and `_finish_leaves`.
VAES = host_has("vaes", "avx512f") and LEAF_BLOCKS % 4 == 0
_ROUND_KEYS = round_keys(_AES_KEY).reshape(-1)
_VALUE_TWEAKS = T_VALUE.reshape(-1)
_AES_ROUND = ir.FunctionType(SLAB, [SLAB, SLAB])
SEED_ONLY = np.zeros((1, 2), np.uint64)  # leaf-level "tweaks" when the seeds themselves are wanted


def _value_blocks(leaves: int):
    """An intrinsic writing `leaves` consecutive leaves' LEAF_BLOCKS value blocks: for leaf j,
    out.flat[o + 2Wj :][:2W] = pi(s_j ^ c_w) ^ s_j ^ c_w, plus cw.flat[c :][:2W] where the
    leaf's control bit t.flat[ti + j] is set; s_j = seeds.flat[s + 2j :][:2]; pi is AES-128
    with round keys rk, 4 blocks per vector, the rounds of all vectors interleaved."""

    @intrinsic
    def run(typingctx, out, o, seeds, s, t, ti, cw, c, tweaks, rk):
        check_c_arrays(out, seeds, t, cw, tweaks, rk)

        def codegen(context, builder, sig, args):
            i64, ta = ir.IntType(64), sig.args
            out_, o, seeds_, s, t_, ti, cw_, c, tweaks_, rk_ = args
            enc = cgutils.get_or_insert_function(
                builder.module, _AES_ROUND, "llvm.x86.aesni.aesenc.512"
            )
            last = cgutils.get_or_insert_function(
                builder.module, _AES_ROUND, "llvm.x86.aesni.aesenclast.512"
            )

            def word(arg, at):
                return builder.load(word_ptr(context, builder, ta[arg], args[arg], at))

            def lanes(lo, hi):  # (lo, hi) in all four 128-bit lanes
                v = builder.insert_element(ir.Constant(SLAB, None), lo, i64(0))
                v = builder.insert_element(v, hi, i64(1))
                order = ir.Constant(ir.VectorType(ir.IntType(32), 8), [0, 1] * 4)
                return builder.shuffle_vector(v, v, order)

            keys = [lanes(word(9, i64(2 * r)), word(9, i64(2 * r + 1))) for r in range(11)]
            x, state, fix, dst = [], [], [], []
            for j in range(leaves):
                at = builder.add(s, i64(2 * j))
                seed = lanes(word(2, at), word(2, builder.add(at, i64(1))))
                mask = builder.sub(i64(0), word(4, builder.add(ti, i64(j))))
                mask = lanes(mask, mask)
                for z in range(LEAF_BLOCKS // 4):
                    tweak = builder.load(
                        slab_ptr(context, builder, ta[8], tweaks_, i64(8 * z)), align=8
                    )
                    x.append(builder.xor(seed, tweak))
                    state.append(builder.xor(x[-1], keys[0]))
                    cw_slab = slab_ptr(context, builder, ta[6], cw_, builder.add(c, i64(8 * z)))
                    fix.append(builder.and_(mask, builder.load(cw_slab, align=8)))
                    at_out = builder.add(o, i64(2 * LEAF_BLOCKS * j + 8 * z))
                    dst.append(slab_ptr(context, builder, ta[0], out_, at_out))
            for r in range(1, 11):
                state = [builder.call(enc if r < 10 else last, [v, keys[r]]) for v in state]
            for v, xv, f, p in zip(state, x, fix, dst, strict=True):
                builder.store(builder.xor(builder.xor(v, xv), f), p, align=8)
            return context.get_dummy_value()

        return types.void(out, o, seeds, s, t, ti, cw, c, tweaks, rk), codegen

    return run


_values_4, _values_1 = _value_blocks(4), _value_blocks(1)


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


@numba.njit(cache=True, nogil=True)
def _split_keys(raw, head, party, seed, cw_seed, cw_bits, cw_out):
    """Check and decode serialized keys of one size, (keys, bytes), into the KeyBatch fields
    in one compiled loop (numpy's dozen small operations cost more on small batches). False
    if any key has a bad header or control byte (`KeyBatch.parse` then says which)."""
    depth, width = cw_seed.shape[0], cw_out.shape[1]
    ctrl = 21 + 16 * depth

    def word(k, at):  # little-endian uint64 at byte `at` of key k
        w = np.uint64(0)
        for b in range(8):
            w |= np.uint64(raw[k, at + b]) << np.uint64(8 * b)
        return w

    for k in range(raw.shape[0]):
        if raw[k, 0] != head[0] or raw[k, 1] != head[1] or raw[k, 2] != head[2]:
            return False
        if raw[k, 3] > 1 or raw[k, 4] != head[4]:
            return False
        party[k] = raw[k, 3]
        for h in range(2):
            seed[k, h] = word(k, 5 + 8 * h)
            for w in range(width):
                cw_out[k, w, h] = word(k, ctrl + depth + 16 * w + 8 * h)
        for level in range(depth):
            c = raw[k, ctrl + level]
            if c > 3:
                return False
            cw_bits[level, k, 0], cw_bits[level, k, 1] = c & 1, c >> 1
            for h in range(2):
                cw_seed[level, k, h] = word(k, 21 + 16 * level + 8 * h)
    return True


@dataclass(frozen=True)
class KeyBatch:
    """Keys of one domain and party mix, stored by field (what `expand` walks level by level).
    `parse` decodes a whole batch of serialized keys with array operations, not key by key."""

    domain_bits: int
    party: np.ndarray  # (keys,) uint64
    seed: np.ndarray  # (keys, 2) uint64
    cw_seed: np.ndarray  # (depth, keys, 2) uint64
    cw_bits: np.ndarray  # (depth, keys, 2) uint64
    cw_out: np.ndarray  # (keys, leaf_blocks(domain_bits), 2) uint64

    def __len__(self) -> int:
        return self.party.size

    @classmethod
    def concat(cls, batches: Sequence[KeyBatch]) -> KeyBatch:
        """One batch from several of the same domain (e.g. concurrent clients' requests)."""
        if len({b.domain_bits for b in batches}) != 1:
            raise ValueError("only batches of one domain size can be joined")
        return cls(
            batches[0].domain_bits,
            np.concatenate([b.party for b in batches]),
            np.concatenate([b.seed for b in batches]),
            np.concatenate([b.cw_seed for b in batches], axis=1),
            np.concatenate([b.cw_bits for b in batches], axis=1),
            np.concatenate([b.cw_out for b in batches]),
        )

    def take(self, rows: slice) -> KeyBatch:
        """A sub-batch (a slice of the keys)."""
        return KeyBatch(
            self.domain_bits,
            self.party[rows],
            self.seed[rows],
            self.cw_seed[:, rows],
            self.cw_bits[:, rows],
            self.cw_out[rows],
        )

    @classmethod
    def of(cls, keys: Sequence[DPFKey]) -> KeyBatch:
        if not keys:
            raise ValueError("a key batch needs at least one DPF key")
        bits = {k.domain_bits for k in keys}
        if len(bits) != 1:
            raise ValueError(f"keys of one batch must share a domain size, got domain_bits {bits}")
        depth = tree_depth(keys[0].domain_bits)
        return cls(
            keys[0].domain_bits,
            np.array([k.party for k in keys], np.uint64),
            np.stack([k.seed for k in keys]),
            np.stack([k.cw_seed for k in keys], axis=1).reshape(depth, len(keys), 2),
            np.stack([k.cw_bits for k in keys], axis=1).reshape(depth, len(keys), 2),
            np.stack([k.cw_out for k in keys]),
        )

    @classmethod
    def parse(cls, keys: Sequence[bytes]) -> KeyBatch:
        """Decode serialized keys; a malformed one raises ValueError naming its position."""
        if not keys:
            raise ValueError("a key batch needs at least one DPF key")
        try:  # one join for the whole batch; anything not bytes-like fails it
            joined, uniform = b"".join(keys), len(set(map(len, keys))) == 1
        except TypeError:
            joined, uniform = b"", False
        size = len(joined) // len(keys)
        bits = joined[4] if uniform and size >= _HEADER.size else 0
        if not (1 <= bits <= MAX_DOMAIN_BITS and size == key_size(bits)):
            cls._raise_first_bad(keys)
        raw = np.frombuffer(joined, np.uint8).reshape(len(keys), -1)
        depth, n = tree_depth(bits), len(keys)
        fields = (
            np.empty(n, np.uint64),
            np.empty((n, 2), np.uint64),
            np.empty((depth, n, 2), np.uint64),
            np.empty((depth, n, 2), np.uint64),
            np.empty((n, leaf_blocks(bits), 2), np.uint64),
        )
        if not _split_keys(
            raw, np.frombuffer(_HEADER.pack(MAGIC, VERSION, 0, bits), np.uint8), *fields
        ):
            cls._raise_first_bad(keys)
        return cls(bits, *fields)

    @staticmethod
    def _raise_first_bad(keys: Sequence[bytes]) -> None:
        ref = None
        for i, data in enumerate(keys):
            try:
                key = DPFKey.from_bytes(data)
            except ValueError as exc:
                raise ValueError(f"key {i}: {exc}") from None
            if ref is not None and key.domain_bits != ref:
                raise ValueError(
                    f"key {i} is for a 2^{key.domain_bits} domain, key 0 for 2^{ref}: "
                    "keys of one batch must share a domain size"
                )
            ref = key.domain_bits
        raise AssertionError("unreachable: some key was malformed")


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
        self.enc = Cipher(algorithms.AES(_AES_KEY), modes.ECB()).encryptor()

    def buffers(self, words: int) -> tuple[list[np.ndarray], np.ndarray]:
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
        work.enc.update_into(inp.reshape(-1).view(np.uint8), aes_out.view(np.uint8))
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
        _AES_LEAVES[threads](words, inp.reshape(keys, -1), t, cw_out, _VALUE_TWEAKS, _ROUND_KEYS)
    else:
        work.enc.update_into(inp.reshape(-1).view(np.uint8), aes_out.view(np.uint8))
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
