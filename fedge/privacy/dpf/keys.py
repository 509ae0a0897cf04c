"""The DPF key format: sizes, one key (`DPFKey`) and a batch stored by field (`KeyBatch`).

A serialized key (format version 2, little-endian) is

    header   5 bytes   magic b"DP", version, party (0 or 1), domain bits n (1..40)
    seed     16 bytes  the party's root seed (bit 0 clear: the control bit lives there)
    cw_seed  16 bytes per tree level, depth = max(n - LEAF_BITS, 0) levels
    cw_bits  1 byte per level: bit 0 the left, bit 1 the right control-bit correction
    cw_out   16 bytes per output block of a leaf, leaf_blocks(n) of them

so `key_size(n) = 21 + 17 * depth + 16 * leaf_blocks(n)`. Parsing checks the exact length and
every header field and control byte, and names the defect; nothing here touches the PRG.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np

VERSION = 2  # 2: LEAF_BLOCKS output blocks per leaf (1: one block)
MAGIC = b"DP"
LEAF_BLOCKS = 8  # 128-bit output blocks per leaf (a power of two): fewer leaves, less AES
LEAF_BITS = 6 + LEAF_BLOCKS.bit_length()  # 7 + log2(LEAF_BLOCKS) domain bits per leaf
MAX_DOMAIN_BITS = 40
HEADER = struct.Struct("<2sBBB")  # magic, version, party, domain_bits
ONE = np.uint64(1)  # the control bit of a block (bit 0 of its low word)


def tree_depth(domain_bits: int) -> int:
    """Levels of the seed tree; the last LEAF_BITS bits of the domain live in the leaf blocks."""
    return max(domain_bits - LEAF_BITS, 0)


def leaf_blocks(domain_bits: int) -> int:
    """Output blocks per leaf: LEAF_BLOCKS, or, for a domain smaller than one leaf, only the
    blocks its 2^n bits need (so small tables, e.g. co-design bins, keep small keys)."""
    return min(LEAF_BLOCKS, 1 << max(domain_bits - 7, 0))


def key_size(domain_bits: int) -> int:
    """Bytes of a serialized key: header, seed, per-level correction words, output correction."""
    return HEADER.size + 16 + 17 * tree_depth(domain_bits) + 16 * leaf_blocks(domain_bits)


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
        """The serialized key (see the module docstring for the format)."""
        head = HEADER.pack(MAGIC, VERSION, self.party, self.domain_bits)
        bits = (self.cw_bits[:, 0] | (self.cw_bits[:, 1] << ONE)).astype(np.uint8)
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
        if len(data) < HEADER.size:
            raise ValueError(f"DPF key too short: {len(data)} bytes, header alone is {HEADER.size}")
        magic, version, party, domain_bits = HEADER.unpack_from(data)
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
        pos = HEADER.size
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
        """A batch of parsed keys (all of one domain size)."""
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
        bits = joined[4] if uniform and size >= HEADER.size else 0
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
            raw, np.frombuffer(HEADER.pack(MAGIC, VERSION, 0, bits), np.uint8), *fields
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
