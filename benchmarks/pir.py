"""PIR server throughput: fedge's one-pass batched server against a naive peer and the
memory-bandwidth bound, side by side in one run.

For each table (rows x 64 B, random bytes) and batch size, one server's end-to-end time per
batch: serialized keys in, answers out (key decoding, DPF expansion, inner product).

- fedge: `PIRServer.answer`: one pass over the table in chunks (subtrees of the DPF tree),
  each chunk's bits expanded for the whole batch right before the numba kernel XORs its rows
  in, chunks shared by the threads. Its kernel is the layout's best: "affine" (GFNI, 8x8 bit
  matrices) on CPUs that have it, else "stream" for one query and "gray" for more. For
  reference, on the row layout: the portable kernels any CPU runs (stream/gray) and the plain
  mask-and-XOR kernel (both timed once where batch x rows > 2^24), and the CPU time of the
  expansion alone (same chunks, one thread), to tell whether expansion or the kernel dominates;
- naive: per query, a full-domain evaluation of its key alone, then numpy's gather-and-XOR
  of the selected rows (on large tables timed on the first few queries of the batch);
- bound: one numpy pass over the table (XOR-reduce of all its words, one thread): the time any batch
  needs at least if it only had to stream the table once from memory.

    .venv/bin/python benchmarks/pir.py                  # 2^16, 2^20, 2^22 rows
    .venv/bin/python benchmarks/pir.py --gib            # and a 1 GiB table (2^24 rows)
"""

from __future__ import annotations

import argparse
import json
import os
import time
import tracemalloc
from pathlib import Path

import numba
import numpy as np

from fedge.privacy.dpf import DPFKey, Workspace, eval_all, expand_below, node_seeds
from fedge.privacy.pir import PIRServer, plan_pass, query

ROW_BYTES = 64


def best(fn, repeats: int) -> float:
    """Least wall time of `repeats` runs."""
    return min(timed(fn)[0] for _ in range(repeats))


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one run; CPU counts every thread of this process."""
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - start_cpu


def naive_answer(table: np.ndarray, key: bytes) -> np.ndarray:
    """The per-query peer: this key's expansion as a bit mask, then gather-and-XOR."""
    mask = eval_all(DPFKey.from_bytes(key))[: table.shape[0]].astype(bool)
    return np.bitwise_xor.reduce(table[mask], axis=0)


def expansion_cpu(server: PIRServer, keys: list[bytes], repeats: int) -> float:
    """CPU seconds of the batch's expansion alone, cut into the server's chunks, one thread."""
    batch = server.check(keys)
    plan = plan_pass(server.table.rows, server.table.width, len(batch), batch.domain_bits)

    def run() -> None:
        seeds, t = node_seeds(batch, plan.level)
        work = Workspace()
        for j in range(plan.count):
            node_t = np.ascontiguousarray(t[:, j : j + 1])
            expand_below(batch, seeds[:, j : j + 1], node_t, plan.level, work, False)

    return min(timed(run)[1] for _ in range(repeats))


def peak_mib(fn) -> float:
    """Peak memory allocated (numpy, Python) while fn runs, beyond what was held before."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def bench_table(
    rows: int, batches: list[int], repeats: int, naive_max: int, device: str
) -> list[dict]:
    rng = np.random.default_rng(rows)
    table = rng.integers(0, 2**63, (rows, ROW_BYTES // 8), dtype=np.uint64)
    server = PIRServer(table, party=0, device=device)
    rows_server = PIRServer(table, party=0, layout="rows")
    server.answer(query([0], rows)[0])  # warm-up: numba caches, page faults
    flat = table.reshape(-1)
    bound_s = best(lambda: np.bitwise_xor.reduce(flat), repeats)
    results = []
    for batch in batches:
        keys, _ = query(rng.integers(0, rows, batch), rows)
        server.answer(keys)
        runs = [timed(lambda keys=keys: server.answer(keys)) for _ in range(repeats)]
        fedge_s, cpu_s = min(w for w, _ in runs), min(c for _, c in runs)
        ref_repeats = repeats if rows * batch <= 1 << 24 else 1  # slow on big batches
        rows_s = best(lambda keys=keys: rows_server.answer(keys), ref_repeats)
        mask_s = best(lambda keys=keys: rows_server.answer(keys, kernel="mask"), ref_repeats)
        mem = peak_mib(lambda keys=keys: server.answer(keys))
        expand_s = expansion_cpu(server, keys, min(repeats, 3))
        sample = keys[: min(batch, naive_max)]
        naive_s = best(lambda sample=sample: [naive_answer(table, k) for k in sample], 1)
        naive_s *= batch / len(sample)
        row = {
            "rows": rows,
            "table_mib": table.nbytes / 2**20,
            "batch": batch,
            "fedge_qps": batch / fedge_s,
            "fedge_latency_ms": fedge_s * 1e3,
            "fedge_q_per_cpu_s": batch / cpu_s,
            "fedge_cpu_ms": cpu_s * 1e3,
            "expansion_cpu_ms": expand_s * 1e3,
            "kernel": server.table.kernel("auto", batch) if device == "cpu" else f"torch {device}",
            "rows_layout_qps": batch / rows_s,
            "mask_kernel_qps": batch / mask_s,
            "naive_qps": batch / naive_s,
            "naive_timed_queries": len(sample),
            "bound_pass_ms": bound_s * 1e3,
            "bound_gbps": table.nbytes / bound_s / 1e9,
            "fedge_gbps": table.nbytes / fedge_s / 1e9,
            "fraction_of_bound": bound_s / fedge_s,
            "speedup_vs_naive": naive_s / fedge_s,
            "peak_extra_mib": mem,
        }
        results.append(row)
        print(
            f"rows 2^{rows.bit_length() - 1} batch {batch:3d}: {row['fedge_qps']:8.1f} q/s "
            f"({row['fedge_latency_ms']:.1f} ms/batch, CPU {row['fedge_cpu_ms']:.1f} ms of which "
            f"expansion {row['expansion_cpu_ms']:.1f}), rows layout {row['rows_layout_qps']:.1f}, "
            f"mask {row['mask_kernel_qps']:.1f}, "
            f"naive {row['naive_qps']:.2f}, pass {row['bound_pass_ms']:.1f} ms",
            flush=True,
        )
    return results


def markdown(results: list[dict]) -> str:
    lines = [
        "| rows x 64 B | table | batch | kernel | fedge q/s | latency/batch | q per CPU-s "
        "| CPU/batch (expansion) | rows-layout q/s | mask-kernel q/s "
        "| naive q/s | speedup vs naive | one-pass bound | fedge / bound | peak extra |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        size = (
            f"{r['table_mib'] / 1024:.0f} GiB"
            if r["table_mib"] >= 1024
            else (f"{r['table_mib']:.0f} MiB")
        )
        lines.append(
            f"| 2^{r['rows'].bit_length() - 1} | {size} | {r['batch']} | {r['kernel']} "
            f"| {r['fedge_qps']:,.1f} "
            f"| {r['fedge_latency_ms']:,.1f} ms | {r['fedge_q_per_cpu_s']:,.1f} "
            f"| {r['fedge_cpu_ms']:,.1f} ms ({r['expansion_cpu_ms']:,.1f} ms) "
            f"| {r['rows_layout_qps']:,.1f} | {r['mask_kernel_qps']:,.1f} "
            f"| {r['naive_qps']:,.2f} | {r['speedup_vs_naive']:,.0f}x "
            f"| {r['bound_pass_ms']:.1f} ms ({r['bound_gbps']:.1f} GB/s) "
            f"| {r['fraction_of_bound']:.2f} | {r['peak_extra_mib']:,.0f} MiB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log-rows", default="16,20,22", help="table sizes, log2 of rows")
    parser.add_argument("--gib", action="store_true", help="add the 1 GiB table (2^24 rows)")
    parser.add_argument("--batches", default="1,16,128")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-max", type=int, default=8, help="naive queries timed per batch")
    parser.add_argument("--json", default="", help="also write results to this JSON file")
    parser.add_argument(
        "--device",
        default="cpu",
        help="fedge's answer step: cpu (numba) or a torch device such as cuda (the peers stay "
        "on the CPU)",
    )
    args = parser.parse_args()
    sizes = [int(x) for x in args.log_rows.split(",")] + ([24] if args.gib else [])
    batches = [int(x) for x in args.batches.split(",")]
    load = os.getloadavg()
    print(
        f"fedge on {args.device}, numba threads {numba.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (shared cores)"
    )
    results = []
    for log_rows in sizes:
        results += bench_table(1 << log_rows, batches, args.repeats, args.naive_max, args.device)
    print(markdown(results))
    end = os.getloadavg()
    print(f"load average at the end {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        out = {"load_start": load, "load_end": end, "results": results}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
