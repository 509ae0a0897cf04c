"""Two-server PIR: exact rows for any table shape and dtype, both kernels, the torch path."""

import numpy as np
import pytest

from fedge.privacy import pir
from fedge.privacy.dpf import DPFKey, expand


def _table(rng, rows, row_shape, dtype):
    raw = rng.integers(0, 256, (rows, *row_shape, np.dtype(dtype).itemsize), dtype=np.uint8)
    return raw.view(dtype).reshape(rows, *row_shape)


def _fetch(table, indices, kernel="auto"):
    a, b = pir.PIRServer(table, party=0), pir.PIRServer(table, party=1)
    keys_a, keys_b = pir.query(indices, table.shape[0])
    return pir.reconstruct(a.answer(keys_a, kernel), b.answer(keys_b, kernel), a.spec)


def _same(x, y):  # bitwise, so NaN payloads in random float tables compare too
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


CASES = [
    (1, (3,), np.float32),
    (2, (), np.int8),
    (63, (5,), np.uint8),
    (64, (64,), np.uint8),
    (65, (8,), np.float16),
    (129, (4, 3), np.float32),
    (1000, (16,), np.int8),
    (4097, (1,), np.int64),
    (3000, (24,), np.float16),
    (777, (), "S13"),
]


@pytest.mark.parametrize("rows, row_shape, dtype", CASES)
@pytest.mark.parametrize("kernel", ["mask", "gray"])
def test_exact_rows_for_any_shape_and_dtype(rows, row_shape, dtype, kernel):
    rng = np.random.default_rng(rows)
    table = _table(rng, rows, row_shape, dtype)
    indices = np.concatenate([[0, rows - 1], rng.integers(0, rows, 9)])
    assert _same(_fetch(table, indices, kernel), table[indices])


@pytest.mark.parametrize("batch", [1, 7, 8, 33])
def test_batches_across_threads(batch):
    """A table big enough to be split between threads, with a row count that is not a
    multiple of 64 (the tail of the last chunk takes the mask loop)."""
    rng = np.random.default_rng(batch)
    table = _table(rng, (1 << 15) + 37, (64,), np.uint8)
    indices = rng.integers(0, table.shape[0], batch)
    indices[0] = table.shape[0] - 1
    assert _same(_fetch(table, indices), table[indices])


def _torch_devices():
    torch = pytest.importorskip("torch")
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("device", _torch_devices())
def test_torch_answer_path_equals_numba(device):
    rng = np.random.default_rng(3)
    table = _table(rng, 5000, (10,), np.float16)
    indices = np.array([0, 4999, 123, 64, 4095])
    keys_a, keys_b = pir.query(indices, table.shape[0])
    for party, keys in ((0, keys_a), (1, keys_b)):
        cpu = pir.PIRServer(table, party).answer(keys)
        torch_path = pir.PIRServer(table, party, device=device).answer(keys)
        assert np.array_equal(cpu, torch_path)
    server = pir.TorchAnswerer(pir.as_words(table), device, block_bytes=1 << 12)  # many blocks
    bits_a = expand([DPFKey.from_bytes(k) for k in keys_a])
    bits_b = expand([DPFKey.from_bytes(k) for k in keys_b])
    rows = pir.reconstruct(server(bits_a), server(bits_b), pir.PIRServer(table).spec)
    assert _same(rows, table[indices])


def test_one_server_answer_is_not_the_row():
    table = np.arange(256 * 8, dtype=np.uint64).reshape(256, 8)
    keys_a, _ = pir.query([5], 256)
    assert not np.array_equal(pir.PIRServer(table).answer(keys_a)[0], table[5])


def test_errors_are_clear():
    table = np.zeros((100, 4), np.float32)
    with pytest.raises(IndexError, match="out of range"):
        pir.query([100], 100)
    with pytest.raises(IndexError, match="out of range"):
        pir.query([-1], 100)
    keys_a, keys_b = pir.query([1], 100)
    with pytest.raises(ValueError, match="party"):
        pir.PIRServer(table, party=0).answer(keys_b)
    with pytest.raises(ValueError, match="domain"):
        pir.PIRServer(np.zeros((1000, 4)), party=0).answer(keys_a)
    with pytest.raises(ValueError, match="must be"):
        pir.PIRServer(table, party=0).answer([keys_a[0][:-3]])
    with pytest.raises(ValueError, match="at least one row"):
        pir.PIRServer(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="answers disagree"):
        pir.reconstruct(np.zeros((1, 2), np.uint64), np.zeros((2, 2), np.uint64))
