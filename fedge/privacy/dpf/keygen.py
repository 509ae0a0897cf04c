"""Key generation (BGI-2016, Fig. 1, with early termination): `gen` and `gen_batch`.

Both parties' trees are walked together along the path to alpha, vectorised over the points
of a batch, one PRG call per level. At each level the correction word makes the two parties'
children off the path equal (seed and control bit), so they cancel in every expansion below;
on the path the children stay different and exactly one party's control bit is set. The last
correction, over the leaf's value blocks, turns the path's leaf into the unit vector at alpha.
Seeds come from `secrets` (the OS CSPRNG).
"""

from __future__ import annotations

import secrets

import numpy as np

from fedge.privacy.dpf.keys import MAX_DOMAIN_BITS, ONE, DPFKey, leaf_blocks, tree_depth
from fedge.privacy.dpf.prg import BRANCH, T_VALUE, prg


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
    roots[..., 0] &= ~ONE  # the control bit lives in bit 0 of a child block, so seeds drop it
    s = roots.copy()  # (party, key, 2)
    t = np.array([[0], [1]], np.uint64).repeat(k, axis=1)  # (party, key)
    cw_seed = np.empty((k, depth, 2), np.uint64)
    cw_bits = np.empty((k, depth, 2), np.uint64)
    leaf_bits = domain_bits - depth
    for level in range(depth):
        a = ((alphas >> (domain_bits - 1 - level)) & 1).astype(np.uint64)  # (key,)
        child = prg(s, BRANCH)  # (party, key, side, 2)
        tc = child[..., 0] & ONE
        child[..., 0] &= ~ONE
        lose = 1 - a.astype(np.int64)
        rows = np.arange(k)
        cw_s = child[0, rows, lose] ^ child[1, rows, lose]
        cw_t = tc[0] ^ tc[1] ^ np.stack([a ^ ONE, a], axis=1)
        keep = a.astype(np.int64)
        mask = (0 - t)[..., None]  # all-ones where the control bit is set
        s = child[:, rows, keep] ^ (mask & cw_s)
        t = tc[:, rows, keep] ^ (t & cw_t[rows, keep])
        cw_seed[:, level], cw_bits[:, level] = cw_s, cw_t
    width = leaf_blocks(domain_bits)
    conv = prg(s, T_VALUE[:width])  # (party, key, width, 2)
    low = alphas & ((1 << leaf_bits) - 1)
    unit = np.zeros((k, width, 2), np.uint64)
    unit.reshape(k, -1)[np.arange(k), low >> 6] = ONE << (low & 63).astype(np.uint64)
    cw_out = conv[0] ^ conv[1] ^ unit
    keys_a, keys_b = (
        [DPFKey(p, domain_bits, roots[p, i], cw_seed[i], cw_bits[i], cw_out[i]) for i in range(k)]
        for p in (0, 1)
    )
    return keys_a, keys_b


def gen(alpha: int, domain_bits: int) -> tuple[DPFKey, DPFKey]:
    """Two keys whose expansions XOR to the unit vector at alpha in a 2^domain_bits domain."""
    k0, k1 = gen_batch(np.array([alpha]), domain_bits)
    return k0[0], k1[0]
