"""The PRG: fixed-key AES-128 in Matyas-Meyer-Oseas form, G(s) = pi(s ^ c) ^ s ^ c.

pi is AES-128 under a public fixed key; each output of a seed has its own public tweak c: the
left child (c = 0), the right child, and the LEAF_BLOCKS leaf values. Two implementations give
the same bits (tested):

- `aes` / `prg`: `cryptography`'s AES-ECB over whole arrays of blocks, one call per tree level
  of a whole batch of keys (any CPU);
- `value_blocks`: on CPUs with VAES, the AES rounds run in 512-bit registers (4 blocks each,
  all of a leaf's vectors interleaved) with fedge's own key schedule (`round_keys`, checked
  against FIPS-197), the feed-forward and the output correction added before the one store.

The expansion's compiled kernels inline `value_blocks`; numba's cache checks only the file of
the function it compiles, so after editing this file clear the expansion's cache
(`fedge/privacy/dpf/__pycache__/expansion*.nbi`/`.nbc`).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from fedge.privacy.dpf.keys import LEAF_BLOCKS
from fedge.privacy.simd import SLAB, check_c_arrays, host_has, slab_ptr, word_ptr

if sys.byteorder != "little":  # the uint64 views of AES blocks assume it
    raise ImportError("fedge.privacy.dpf needs a little-endian machine")

# Public constants: the fixed AES key and the tweaks (left child, right child, LEAF_BLOCKS leaf
# values). The value tweaks share a hashed low word and count 1..W in the high word: distinct from
# each other and from the branch tweaks (whose high words are 0 and a hash word).
AES_KEY = hashlib.sha256(b"fedge-dpf-v1 fixed-key AES").digest()[:16]
_RANDOM = np.frombuffer(hashlib.sha256(b"fedge-dpf-v1 tweaks").digest()[:24], np.uint64)
BRANCH = np.stack([np.zeros(2, np.uint64), _RANDOM[:2]])  # left child: s itself; right: s ^ c
T_VALUE = np.stack(  # (LEAF_BLOCKS, 2)
    [np.full(LEAF_BLOCKS, _RANDOM[2]), np.arange(1, LEAF_BLOCKS + 1, dtype=np.uint64)], axis=1
)
SEED_ONLY = np.zeros((1, 2), np.uint64)  # leaf-level "tweaks" when the seeds themselves are wanted


def aes_encryptor() -> CipherContext:
    """A fresh fixed-key AES-128 ECB context (`update_into` a preallocated buffer)."""
    return Cipher(algorithms.AES(AES_KEY), modes.ECB()).encryptor()


def aes(blocks: np.ndarray) -> np.ndarray:
    """Fixed-key AES-128 over every 16-byte block of a uint64 array: one ECB call."""
    flat = np.ascontiguousarray(blocks).reshape(-1)
    out = np.empty(flat.size + 2, np.uint64)  # update_into wants block_size - 1 spare bytes
    aes_encryptor().update_into(flat.view(np.uint8).data, out.view(np.uint8).data)
    return out[: flat.size].reshape(blocks.shape)


def prg(seeds: np.ndarray, tweaks: np.ndarray) -> np.ndarray:
    """MMO PRG: seeds (..., 2) -> (..., len(tweaks), 2) blocks pi(s ^ c) ^ s ^ c."""
    x = seeds[..., None, :] ^ tweaks
    return aes(x) ^ x


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
# computed whole in registers; elsewhere they go through `cryptography`.
VAES = host_has("vaes", "avx512f") and LEAF_BLOCKS % 4 == 0
ROUND_KEYS = round_keys(AES_KEY).reshape(-1)  # flat, as `value_blocks` reads them
VALUE_TWEAKS = T_VALUE.reshape(-1)  # flat, as `value_blocks` reads them
AES_ROUND = ir.FunctionType(SLAB, [SLAB, SLAB])


def value_blocks(leaves: int) -> Callable:
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
                builder.module, AES_ROUND, "llvm.x86.aesni.aesenc.512"
            )
            last = cgutils.get_or_insert_function(
                builder.module, AES_ROUND, "llvm.x86.aesni.aesenclast.512"
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
