"""DPF: exact point functions, key serialization, malformed keys, and single-key privacy."""

import numpy as np
import pytest

from fedge.privacy import dpf


@pytest.mark.parametrize("bits", [*range(1, 15), 17, 21])
def test_shares_xor_to_the_unit_vector(bits):
    rng = np.random.default_rng(bits)
    for alpha in {0, (1 << bits) - 1, int(rng.integers(1 << bits))}:
        k0, k1 = dpf.gen(alpha, bits)
        v = dpf.eval_all(k0) ^ dpf.eval_all(k1)
        assert v.size == 1 << bits
        assert np.flatnonzero(v).tolist() == [alpha]


def test_aes_round_keys_match_fips_197():
    """The key schedule the in-register AES uses: FIPS-197 appendix A.1's last round key."""
    keys = dpf.round_keys(bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c"))
    assert keys[0].tobytes().hex() == "2b7e151628aed2a6abf7158809cf4f3c"
    assert keys[10].tobytes().hex() == "d014f9a8c9ee2589e13f0cc8b6630ca6"


@pytest.mark.parametrize("bits", [1, 6, 9, dpf.LEAF_BITS, 11, 13, 16, 20])
def test_leaf_values_in_registers_equal_the_cryptography_path(bits, monkeypatch):
    """Where the CPU has VAES, leaves are computed with AES in registers: the same bits as
    `cryptography`'s AES plus `_finish_leaves` (elsewhere only that path runs)."""
    alphas = np.random.default_rng(bits).integers(0, 1 << bits, 9)
    keys = dpf.gen_batch(alphas, bits)[0]
    paths = []
    for fused in [False] + [True] * dpf.VAES:
        monkeypatch.setattr(dpf.expansion, "VAES", fused)
        paths.append(dpf.expand(keys))
        seeds, t = dpf.node_seeds(dpf.KeyBatch.of(keys), dpf.tree_depth(bits))
        paths.append(dpf.expand_below(dpf.KeyBatch.of(keys), seeds, t, dpf.tree_depth(bits)))
    assert all(np.array_equal(p, paths[0]) for p in paths)


def test_batch_expansion_equals_one_key_at_a_time():
    alphas = np.array([0, 1, 127, 128, 1023, 1024, 4095, 2**14 - 1, 777])
    keys0, keys1 = dpf.gen_batch(alphas, 14)
    batch = dpf.expand(keys0) ^ dpf.expand(keys1)
    for i, alpha in enumerate(alphas):
        single = dpf.expand([keys0[i]])[0]
        assert np.array_equal(single, dpf.expand(keys0)[i])
        bits = np.unpackbits(batch[i].view(np.uint8), bitorder="little")
        assert np.flatnonzero(bits).tolist() == [alpha]


def test_key_bytes_round_trip_and_size():
    for bits in (3, 7, dpf.LEAF_BITS, 20, 32):
        k0, k1 = dpf.gen(5, bits)
        for key in (k0, k1):
            data = key.to_bytes()
            depth = max(bits - dpf.LEAF_BITS, 0)
            size = 5 + 16 + 17 * depth + 16 * dpf.leaf_blocks(bits)
            assert len(data) == dpf.key_size(bits) == size
            back = dpf.DPFKey.from_bytes(data)
            assert back.to_bytes() == data
            if bits <= 20:
                assert np.array_equal(dpf.eval_all(back), dpf.eval_all(key))


def test_keys_use_fresh_randomness():
    a, b = dpf.gen(3, 12), dpf.gen(3, 12)
    assert a[0].to_bytes() != b[0].to_bytes()
    assert a[0].to_bytes()[5:21] != a[1].to_bytes()[5:21]  # the two root seeds differ


_CTRL = 5 + 16 + 16 * dpf.tree_depth(12)  # first control-bit byte of a 2^12 key


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: b"XX" + d[2:], "magic"),
        (lambda d: d[:2] + b"\x09" + d[3:], "version"),
        (lambda d: d[:3] + b"\x02" + d[4:], "party"),
        (lambda d: d[:4] + b"\x00" + d[5:], "domain_bits"),
        (lambda d: d[:4] + b"\x0d" + d[5:], "must be"),
        (lambda d: d[:-1], "must be"),
        (lambda d: d + b"\x00", "must be"),
        (lambda d: d[:3], "too short"),
        (lambda d: d[:_CTRL] + b"\x07" + d[_CTRL + 1 :], "control-bit"),
    ],
)
def test_malformed_keys_are_rejected(mutate, message):
    data = dpf.gen(9, 12)[0].to_bytes()
    with pytest.raises(ValueError, match=message):
        dpf.DPFKey.from_bytes(mutate(data))
    with pytest.raises(ValueError, match=f"key 1: .*{message}"):
        dpf.KeyBatch.parse([data, mutate(data)])


def test_a_version_1_key_is_refused():
    """A key of the old format (one output block per leaf, 7 leaf bits) with a valid v1 size:
    refused for its version, not misread."""
    v1 = b"DP\x01\x00\x0c" + bytes(16 + 17 * (12 - 7) + 16)
    with pytest.raises(ValueError, match="version 1 unsupported.*version 2.*new keys"):
        dpf.DPFKey.from_bytes(v1)
    with pytest.raises(ValueError, match="key 0: DPF key version 1"):
        dpf.KeyBatch.parse([v1])


@pytest.mark.parametrize("bits", [dpf.LEAF_BITS - 1, dpf.LEAF_BITS, dpf.LEAF_BITS + 1])
def test_every_point_near_one_leaf(bits):
    """Below, at and just above one leaf's width: every alpha gives exactly e_alpha (every
    output block and word of a leaf, and both leaves when the tree has a level)."""
    alphas = np.arange(1 << bits)
    keys0, keys1 = dpf.gen_batch(alphas, bits)
    for alpha, k0, k1 in zip(alphas, keys0, keys1, strict=True):
        v = dpf.eval_all(k0) ^ dpf.eval_all(k1)
        assert v.size == 1 << bits
        assert np.flatnonzero(v).tolist() == [alpha]


def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        dpf.gen(16, 4)
    with pytest.raises(ValueError, match="domain_bits"):
        dpf.gen(0, 0)
    with pytest.raises(ValueError, match="bytes"):
        dpf.DPFKey.from_bytes("not bytes")
    with pytest.raises(ValueError, match="share a domain"):
        dpf.expand([dpf.gen(0, 8)[0], dpf.gen(0, 9)[0]])


def _bit_frequencies(alpha: int, party: int, n: int, bits: int) -> np.ndarray:
    keys = dpf.gen_batch(np.full(n, alpha), bits)[party]
    raw = np.frombuffer(b"".join(k.to_bytes()[5:] for k in keys), np.uint8).reshape(n, -1)
    depth = dpf.tree_depth(bits)
    layout = np.unpackbits(raw, axis=1, bitorder="little").astype(float)
    keep = np.ones(layout.shape[1], bool)
    # public constants: bit 0 of the root seed and of each seed correction (it is where the
    # PRG puts the control bit), and the 6 unused bits of each level's control-bit byte
    keep[0 : 128 * (1 + depth) : 128] = False
    start = (16 + 16 * depth) * 8
    for level in range(depth):
        keep[start + level * 8 + 2 : start + level * 8 + 8] = False
    assert not layout[:, ~keep].any()
    return layout[:, keep].mean(axis=0)


@pytest.mark.parametrize("party", [0, 1])
def test_a_single_key_does_not_depend_on_the_index(party):
    """Every bit of one party's key (seed, per-level seed and control-bit corrections, output
    correction) is a fair coin whatever alpha is: two far-apart alphas give the same
    frequencies within 5 standard deviations."""
    n, bits = 4000, dpf.LEAF_BITS + 4
    sigma = 0.5 / np.sqrt(n)
    lo, hi = _bit_frequencies(0, party, n, bits), _bit_frequencies((1 << bits) - 1, party, n, bits)
    assert np.all(np.abs(lo - 0.5) < 5 * sigma)
    assert np.all(np.abs(hi - 0.5) < 5 * sigma)
    assert np.all(np.abs(lo - hi) < 5 * np.sqrt(2) * sigma)


def test_a_single_share_is_unbiased_at_the_point():
    """One party's expansion at alpha (and anywhere) is 1 half the time: no bit marks alpha."""
    n, bits = 3000, dpf.LEAF_BITS + 2
    rng = np.random.default_rng(0)
    alphas = rng.integers(0, 1 << bits, n)
    keys0, _ = dpf.gen_batch(alphas, bits)
    share = np.unpackbits(dpf.expand(keys0).view(np.uint8), axis=1, bitorder="little")
    at_alpha = share[np.arange(n), alphas].mean()
    assert abs(at_alpha - 0.5) < 5 * 0.5 / np.sqrt(n)
    assert abs(share.mean() - 0.5) < 0.01


def test_batch_parse_matches_objects_and_names_the_bad_key():
    keys0, _ = dpf.gen_batch(np.array([1, 200, 4000]), 12)
    data = [k.to_bytes() for k in keys0]
    parsed, built = dpf.KeyBatch.parse(data), dpf.KeyBatch.of(keys0)
    for field in ("party", "seed", "cw_seed", "cw_bits", "cw_out"):
        assert np.array_equal(getattr(parsed, field), getattr(built, field))
    assert np.array_equal(dpf.expand(parsed), dpf.expand(keys0))
    with pytest.raises(ValueError, match="key 1: .*must be"):
        dpf.KeyBatch.parse([data[0], data[1][:-1], data[2]])
    with pytest.raises(ValueError, match="key 2: not a DPF key"):
        dpf.KeyBatch.parse([data[0], data[1], b"XX" + data[2][2:]])
    with pytest.raises(ValueError, match="key 1 is for a 2\\^13 domain"):
        dpf.KeyBatch.parse([data[0], dpf.gen(0, 13)[0].to_bytes()])


def test_expansion_in_key_groups_equals_one_group(monkeypatch):
    keys0, _ = dpf.gen_batch(np.arange(0, 2**13, 700), 13)
    whole = dpf.expand(keys0)
    per_key = 16 * dpf.LEAF_BLOCKS << dpf.tree_depth(13)  # the leaf blocks of one key
    monkeypatch.setattr(dpf.expansion, "EXPAND_BUFFER_BYTES", 3 * per_key)  # groups of 3 keys
    assert np.array_equal(dpf.expand(keys0), whole)
