"""What both sides of SecAgg+ compute: the graph, the keys, the masks and the encoding.

Masked vectors live in Z_{2^64}, where numpy's uint64 arithmetic wraps by itself. A client's
vector is [w, w * q(delta)]: its weight w (an integer, e.g. its number of examples) and its
quantized update; the sum over the survivors gives the weighted mean update exactly, up to
the quantization. Masks expand a seed with AES-256 in counter mode under SHA-256(seed) (a
CSPRNG, so a masked vector is uniform to anyone without the seeds): the self-mask seed b (15
bytes from `secrets`) and the pairwise seeds (32 bytes from ECDH + HKDF).
Flower's primitives do the rest: P-384 key pairs, ECDH + HKDF key agreement, Fernet
encryption of the shares, Shamir sharing over GF(2^128) and stochastic quantization.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from flwr.app import Array, ArrayRecord
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.quantization import dequantize, quantize

# The self-mask seed b_u: 120 bits, so that Flower's padded Shamir shares hold one 16-byte block
# (16 bytes would take two, and rebuilding every survivor's b is most of the server's time).
SEED_BYTES = 15
KEY_BYTES = 48  # a P-384 private value, as shared with Shamir
SECURITY_BITS = 40  # Bell et al.'s statistical security parameter sigma
# The fraction of a round's clients (dropouts plus clients colluding with the server) that the
# graph is sized to survive: with more of them removed the graph may fall apart.
BAD_FRACTION = 1 / 3
MAX_QUANT_BITS = 30  # Flower's quantize() returns int32 values in [0, 2^bits]


# --- the graph ------------------------------------------------------------------------
def graph_degree(n: int) -> int:
    """k for n clients: the smallest even degree whose random Harary graph stays connected,
    but with probability 2^-(sigma+1), once BAD_FRACTION of the nodes are removed (Bell et
    al. 2020, section 3, the union bound over pairs of gaps of k/2 removed neighbours in the
    ring); the complete graph (n - 1) when no smaller degree does. k = O(log n)."""
    bad = math.floor(BAD_FRACTION * n)
    limit = -(SECURITY_BITS + 1) * math.log(2)
    for k in range(2, n - 1, 2):
        if k > bad:
            return k  # fewer bad nodes than a gap needs: the graph cannot disconnect
        log_p = (
            math.log(n)
            + math.log(n - k - 1)
            - math.log(2)
            + math.lgamma(bad + 1)
            + math.lgamma(n - k + 1)
            - math.lgamma(n + 1)
            - math.lgamma(bad - k + 1)
        )
        if log_p < limit:
            return k
    return max(1, n - 1)


def harary_graph(nodes: Sequence[int], degree: int) -> dict[int, list[int]]:
    """A random Harary graph H(n, k): the nodes in an order drawn from the OS's CSPRNG, each
    joined to the k/2 next and previous ones in that ring (all others for k >= n - 1)."""
    order = list(nodes)
    random.SystemRandom().shuffle(order)
    n = len(order)
    if degree >= n - 1:
        return {u: [v for v in order if v != u] for u in order}
    half = degree // 2
    return {
        u: sorted({order[(i + d) % n] for d in range(-half, half + 1) if d})
        for i, u in enumerate(order)
    }


def threshold(fraction: float, holders: int) -> int:
    """t: shares needed to rebuild a secret split among `holders` (a client and its
    neighbours), at least 2 (Shamir with t = 1 is no sharing) and at most `holders`."""
    return min(holders, max(2, math.ceil(fraction * holders)))


# --- keys and masks -------------------------------------------------------------------
def private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The raw private value (48 bytes; Flower's PEM is 306 and Shamir costs per byte)."""
    return key.private_numbers().private_value.to_bytes(KEY_BYTES, "big")


def private_key(data: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(data, "big"), ec.SECP384R1())


def agreed_key(own: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    """Flower's ECDH + HKDF shared key (urlsafe base64, as Fernet takes it)."""
    return generate_shared_key(own, peer)


def pair_seed(own: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    """s_{u,v}: the seed of the pairwise mask, the same from both ends."""
    return base64.urlsafe_b64decode(agreed_key(own, peer))


def prg(seed: bytes, size: int) -> np.ndarray:
    """`size` uniform uint64 words: AES-256-CTR keyed by SHA-256(seed) (a fresh seed each round,
    so the zero nonce never repeats under one key)."""
    key = hashlib.sha256(seed).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * size)), dtype=np.uint64).copy()


def pair_sign(own: int, peer: int) -> int:
    """+1 for the lower node id of a pair, -1 for the higher: their masks cancel in the sum."""
    return 1 if own < peer else -1


def add_mask(vector: np.ndarray, seed: bytes, sign: int) -> None:
    """vector += sign * PRG(seed), in Z_2^64 (in place)."""
    if sign > 0:
        vector += prg(seed, vector.size)
    else:
        vector -= prg(seed, vector.size)


# --- the encoding ---------------------------------------------------------------------
def max_weight(bits: int, clients: int) -> int:
    """The largest client weight for which the sum of `clients` vectors cannot wrap."""
    return int((2**64 - 1) // ((2**bits + 1) * max(1, clients)))


def flat_update(reply: ArrayRecord, sent: ArrayRecord) -> np.ndarray:
    """The update reply - sent of every array, in the sent record's order, as one float64
    vector; a reply whose keys or shapes differ from what was sent is refused."""
    if list(reply.keys()) != list(sent.keys()):
        raise ValueError("the trained arrays have other names than the arrays sent")
    parts = []
    for key, array in sent.items():
        base, new = array.numpy(), reply[key].numpy()
        if new.shape != base.shape:
            raise ValueError(f"array {key!r} came back with shape {new.shape}, not {base.shape}")
        parts.append(new.astype(np.float64).ravel() - base.astype(np.float64).ravel())
    return np.concatenate(parts) if parts else np.zeros(0)


def apply_update(sent: ArrayRecord, update: np.ndarray) -> ArrayRecord:
    """sent + update, each array back in its shape and dtype."""
    out, at = {}, 0
    for key, array in sent.items():
        base = array.numpy()
        part = update[at : at + base.size].reshape(base.shape)
        out[key] = Array(np.asarray(base.astype(np.float64) + part).astype(base.dtype))
        at += base.size
    return ArrayRecord(out)


def encode(update: np.ndarray, weight: int, clip_range: float, bits: int) -> np.ndarray:
    """[w, w * q(update)] in uint64: each entry clipped to [-R, R], then stochastically
    rounded onto 0..2^bits (Flower's quantization, unbiased)."""
    quantized = quantize([update], clip_range, 2**bits)[0].astype(np.uint64)
    vector = np.empty(update.size + 1, dtype=np.uint64)
    vector[0] = weight
    vector[1:] = quantized * np.uint64(weight)
    return vector


def decode(total: np.ndarray, clip_range: float, bits: int) -> tuple[int, np.ndarray]:
    """(the weights' sum W, the weighted mean update) from the unmasked sum of vectors."""
    weight = int(total[0])
    if weight == 0:
        raise ValueError("the survivors' weights sum to 0")
    mean_q = total[1:].astype(np.float64) / weight
    return weight, dequantize([mean_q], clip_range, 2**bits)[0]  # type: ignore[list-item]
