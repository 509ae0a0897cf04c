"""Two-server PIR: exact rows for any table shape and dtype, every kernel this CPU has (the
affine kernel where it has GFNI), the torch path."""

import numpy as np
import pytest

from fedge.privacy import pir
from fedge.privacy.dpf import (
    DPFKey,
    KeyBatch,
    Workspace,
    expand,
    expand_below,
    gen_batch,
    node_seeds,
    tree_depth,
)


def _table(rng, rows, row_shape, dtype):
    raw = rng.integers(0, 256, (rows, *row_shape, np.dtype(dtype).itemsize), dtype=np.uint8)
    return raw.view(dtype).reshape(rows, *row_shape)


def _layout(kernel):
    return next(k for k, names in pir.LAYOUT_KERNELS.items() if kernel in names)


def _fetch(table, indices, kernel="auto"):
    layout = "auto" if kernel == "auto" else _layout(kernel)
    a, b = (pir.PIRServer(table, party=p, layout=layout) for p in (0, 1))
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
@pytest.mark.parametrize("kernel", sorted(pir.KERNELS))
def test_exact_rows_for_any_shape_and_dtype(rows, row_shape, dtype, kernel):
    rng = np.random.default_rng(rows)
    table = _table(rng, rows, row_shape, dtype)
    indices = np.concatenate([[0, rows - 1], rng.integers(0, rows, 9)])
    assert _same(_fetch(table, indices, kernel), table[indices])


@pytest.mark.parametrize("batch", [1, 7, 8, 33])
@pytest.mark.parametrize("parallel", [False, True])
def test_batches_across_threads(batch, parallel, monkeypatch):
    """A table split between threads (or not), with a row count that is not a multiple of 64
    (the tail of the last chunk takes the mask loop)."""
    monkeypatch.setattr(pir.layout, "PARALLEL_MIN_WORK", 0 if parallel else 1 << 62)
    rng = np.random.default_rng(batch)
    table = _table(rng, (1 << 15) + 37, (64,), np.uint8)
    indices = rng.integers(0, table.shape[0], batch)
    indices[0] = table.shape[0] - 1
    assert _same(_fetch(table, indices), table[indices])


@pytest.mark.parametrize("kernel", sorted(set(pir.KERNELS) - {"stream"}))
@pytest.mark.parametrize("words", [1, 2, 3, 7, 8, 9, 13, 16, 17])
def test_vector_kernels_equal_the_bit_matrix_product(kernel, words):
    """The four-Russians and affine kernels against numpy's E @ T over GF(2), for row widths
    that are and are not whole 64-byte slabs (gray: padded lanes read the next rows, never past
    the end; affine: 8, 4, 2 and 1-slab runs), and 9 queries (one partial block of 8)."""
    rng = np.random.default_rng(words)
    rows = 64 * 5 + 11
    words_table = rng.integers(0, 2**63, (rows, words), dtype=np.uint64)
    bits = rng.integers(0, 2**63, (9, 6), dtype=np.uint64)
    e = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, :rows].astype(bool)
    for lo, hi in ((0, rows), (64, rows - 3), (128, 192)):
        table = pir.ServerTable.of(words_table[:hi], _layout(kernel))
        acc = table.accumulators(9, kernel)
        pir.KERNELS[kernel](table.part(0, hi), bits, acc, lo, hi)
        part = np.array([np.bitwise_xor.reduce(words_table[lo:hi][m[lo:hi]], axis=0) for m in e])
        assert np.array_equal(table.answers(acc, 9), part)


def test_blocks_layout_holds_each_group_bit_matrix():
    """Byte 7 - i of block (g, column c) has bit r set iff bit i of byte c of row 8g + r is:
    GF2P8AFFINEQB's matrix order; rows past the end are zeros."""
    rng = np.random.default_rng(2)
    words = rng.integers(0, 2**63, (21, 3), dtype=np.uint64)
    blocks = pir.blocks_layout(words).view(np.uint8).reshape(3, 24, 8)
    rows = np.concatenate([words, np.zeros((3, 3), np.uint64)]).view(np.uint8)
    bits = np.unpackbits(rows.reshape(3, 8, 24, 1), axis=3, bitorder="little")  # g, r, c, i
    want = np.packbits(bits.transpose(0, 2, 3, 1)[:, :, ::-1], axis=3, bitorder="little")
    assert np.array_equal(blocks, want[..., 0])
    with pytest.raises(ValueError, match="does not read the 'rows' layout"):
        pir.ServerTable.of(words, "rows").kernel("affine", 4)


@pytest.mark.parametrize("chunk_bits", [1, 1 << 10])
def test_expansion_chunked_into_the_pass(chunk_bits, monkeypatch):
    """Chunks of one leaf (128 rows) or more, many per thread, the last one partial, and the
    chunks past the last row never expanded: still the exact rows."""
    monkeypatch.setattr(pir.layout, "CHUNK_BITS", chunk_bits)
    monkeypatch.setattr(pir.layout, "PARALLEL_MIN_WORK", 0)
    rng = np.random.default_rng(chunk_bits)
    table = _table(rng, 5000, (3,), np.float32)
    indices = np.array([0, 4999, 127, 128, 4095, 4096, *rng.integers(0, 5000, 20)])
    assert _same(_fetch(table, indices), table[indices])


@pytest.mark.parametrize("domain_bits", [7, 8, 13])
def test_subtrees_below_any_level_make_up_the_full_expansion(domain_bits):
    keys, _ = gen_batch(np.array([0, 5, (1 << domain_bits) - 1]), domain_bits)
    batch = KeyBatch.of(keys)
    whole = expand(batch)
    for level in range(tree_depth(domain_bits) + 1):
        seeds, t = node_seeds(batch, level)
        assert np.array_equal(expand_below(batch, seeds, t, level), whole)
        work = Workspace()  # one subtree at a time, buffers reused
        parts = [
            expand_below(batch, seeds[:, j : j + 1], t[:, j : j + 1], level, work).copy()
            for j in range(1 << level)
        ]
        assert np.array_equal(np.concatenate(parts, axis=1), whole)
    with pytest.raises(ValueError, match="level must be"):
        node_seeds(batch, tree_depth(domain_bits) + 1)


def test_answer_many_equals_one_answer_per_table():
    """Bins of one domain size answered together, a table of another size, a big table with
    its own chunked pass: the same answers as one `answer` call each."""
    rng = np.random.default_rng(11)
    shapes = [(480, 16), (481, 16), (300, 16), (2048, 16), (1 << 15, 8), (5, 3)]
    tables = [rng.integers(0, 2**63, s, dtype=np.uint64) for s in shapes]
    servers = [pir.PIRServer(t, party=0) for t in tables]
    keys = [
        pir.query(rng.integers(0, t.shape[0], n), t.shape[0])[0]
        for t, n in zip(tables, [32, 1, 7, 40, 130, 2], strict=True)
    ]
    got = pir.answer_many(servers, keys)
    for server, k, answer in zip(servers, keys, got, strict=True):
        assert np.array_equal(answer, server.answer(k))
    # made together, the blocks layouts of one width share a buffer: one call for a group
    together = pir.PIRServer.many(tables, party=0)
    if pir.AFFINE:
        assert together[0].table.pool is together[2].table.pool is not None
        assert together[4].table.pool is not together[5].table.pool  # widths 8 and 3
    for answer, mine in zip(got, pir.answer_many(together, keys), strict=True):
        assert np.array_equal(mine, answer)
    subset = [2, 0, 1]  # any subset of a shared buffer, in any order
    mine = pir.answer_many([together[i] for i in subset], [keys[i] for i in subset])
    for i, answer in zip(subset, mine, strict=True):
        assert np.array_equal(answer, got[i])
    bad = [keys[0], [keys[1][0][:-1]]]
    with pytest.raises(ValueError, match="key 0: DPF key for a 2\\^9 domain must be"):
        pir.answer_many(servers[:2], bad)
    _, other_party = pir.query([1], 480)
    with pytest.raises(ValueError, match="party"):
        pir.answer_many(servers[:2], [keys[0], other_party])


def _torch_devices():
    torch = pytest.importorskip("torch")
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.mark.parametrize("queries", [5, 40])
@pytest.mark.parametrize("device", _torch_devices())
def test_torch_answer_path_equals_numba(device, queries):
    """The integer-product answer (int8 bits, int32 sums, parity) in blocks of rows, for fewer
    queries than `_int_mm` takes (padded) and more."""
    rng = np.random.default_rng(3)
    table = _table(rng, 5000, (10,), np.float16)
    indices = np.concatenate([[0, 4999, 123, 64, 4095], rng.integers(0, 5000, queries - 5)])
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
    table = np.random.default_rng(0).integers(0, 2**63, (256, 8), dtype=np.uint64)
    keys_a, _ = pir.query(np.arange(20), 256)
    answers = pir.PIRServer(table).answer(keys_a)
    assert not any(np.array_equal(answers[i], table[i]) for i in range(20))


def test_errors_are_clear():
    table = np.zeros((100, 4), np.float32)
    with pytest.raises(IndexError, match="out of range"):
        pir.query([100], 100)
    with pytest.raises(IndexError, match="out of range"):
        pir.query([-1], 100)
    for fractional in ([3.7], np.array([0.5]), [True], ["7"]):
        with pytest.raises(ValueError, match="must be integers"):
            pir.query(fractional, 100)
    with pytest.raises(ValueError, match=r"flat sequence.*\(2, 2\)"):
        pir.query([[1, 2], [3, 4]], 100)
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


def test_codesign_layout_plans_and_fetches_exact_rows():
    from fedge.privacy.codesign import CoDesign, Layout, fetch, serve_pair

    rng = np.random.default_rng(5)
    rows = 1000
    table = _table(rng, rows, (16,), np.float16)
    counts = rng.zipf(1.5, rows).astype(np.int64)
    successor = rng.integers(0, rows, rows)
    for design in (
        CoDesign(cold_queries=40),
        CoDesign(hot_rows=100, hot_queries=8, cold_bins=10, cold_queries=1),
        CoDesign(hot_rows=100, hot_queries=8, cold_bins=10, cold_queries=2, colocate=True),
    ):
        layout = Layout(counts, design, successor)
        members = np.concatenate(layout.members)
        assert np.array_equal(np.sort(members), np.arange(rows))  # every row in one table
        tables = layout.tables(table)
        servers = serve_pair(tables)
        plans = [layout.plan(rng.integers(0, rows, 30), rng) for _ in range(5)]
        for plan in plans:  # the same number of queries to every table, whatever was asked
            assert [q.size for q in plan.queries] == layout.budget
        got = fetch(layout, plans, servers)
        assert set(got) == set(np.concatenate([p.fetched for p in plans]).tolist())
        for i, row in got.items():
            assert row.tobytes() == table[i].tobytes()
        assert layout.cost_rows() == sum(
            b * t.shape[0] for b, t in zip(layout.budget, tables, strict=True)
        )


def test_codesign_budgets_drop_and_colocation_recovers():
    from fedge.privacy.codesign import CoDesign, Layout

    counts = np.arange(64)[::-1].copy()  # row r has rank r
    successor = (np.arange(64) + 1) % 64
    rng = np.random.default_rng(0)
    binned = Layout(counts, CoDesign(cold_bins=4, cold_queries=1))
    assert sorted(binned.plan(np.array([0, 4, 8]), rng).fetched) == [0]  # one bin, one query
    coloc = Layout(counts, CoDesign(cold_bins=4, cold_queries=1, colocate=True), successor)
    assert sorted(coloc.plan(np.array([8, 9]), rng).fetched) == [8, 9]  # 9 rides along with 8
    with pytest.raises(ValueError, match="successor"):
        Layout(counts, CoDesign(colocate=True))
    with pytest.raises(ValueError, match="hot_rows"):
        CoDesign(hot_rows=8)


def test_benchmark_script_runs_and_agrees_with_itself(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "benchmarks/pir.py", "--log-rows", "10", "--batches", "1,9"]
        + ["--repeats", "1", "--naive-max", "2", "--json", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    rows = json.loads(out.read_text())["results"]
    assert [(r["rows"], r["batch"]) for r in rows] == [(1024, 1), (1024, 9)]
    assert all(
        r["fedge_qps"] > 0 and r["naive_qps"] > 0 and r["expansion_cpu_ms"] > 0 for r in rows
    )


@pytest.mark.slow
def test_codesign_simulation_runs(tmp_path):
    import json
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "simulations/pir_codesign.py", "--steps", "5", "--repeats", "1"]
        + ["--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=1200,
    )
    summary = json.loads((tmp_path / "pir_codesign.json").read_text())
    plain = summary["results"][0]
    assert plain["policy"] == "plain PIR" and plain["rows_missed"] == 0.0
    assert all(
        r["kib_scanned_per_inference"] < plain["kib_scanned_per_inference"]
        for r in summary["results"][1:]
    )
