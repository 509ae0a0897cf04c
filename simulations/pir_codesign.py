"""PIR co-design vs plain PIR on a real workload: throughput against perplexity.

Workload. The MobileLLM task's tiny decoder on its real text (Python's reference topics,
byte tokens) gets a private embedding table in the style of hashed n-gram embeddings: one
row per byte 4-gram (the 32,767 most frequent in the training text, row 0 = unknown), 32 fp16
dims = 64-byte rows, projected and added to the token embedding. The byte vocabulary itself
(256 rows) is too small to need PIR; the 4-gram table is the large, Zipf-distributed table the
paper's co-design targets, and which 4-grams a device needs reveals its text. The model is
trained with 4-gram rows dropped at random (p = 0.3) so that a row PIR does not fetch degrades
it gracefully, as the paper's co-design assumes.

Each test window (64 tokens) is one inference: it needs the rows of its 4-grams. Plain PIR
sends one query per token (64, duplicates become dummies) over the whole table; the co-designs
send a fixed budget to a hot table and to cold bins, optionally with co-located rows
(fedge.privacy.codesign). Throughput is measured: one server's wall time to answer a batch of
32 inferences (key decoding, DPF expansion, inner product), all tables. Quality is the test
perplexity with the rows a plan did not fetch set to zero. The rows a plan does fetch are
checked bit-exact through real two-server PIR.

    .venv/bin/python simulations/pir_codesign.py --out runs/pir_codesign
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedge.privacy.codesign import CoDesign, Layout, fetch, serve_pair
from fedge.privacy.pir import PIRServer, answer_many, query
from fedge.tasks.mobilellm.model import build_model
from fedge.tasks.mobilellm.task import MobileLLMTask

NGRAM, ROWS, DIM = 4, 1 << 15, 32

POLICIES = {
    "plain PIR": CoDesign(cold_queries=64),
    "hot/cold": CoDesign(hot_rows=2048, hot_queries=40, cold_queries=12),
    "hot/cold + 16 bins": CoDesign(hot_rows=2048, hot_queries=40, cold_bins=16),
    "hot/cold + 16 bins + co-located": CoDesign(
        hot_rows=2048, hot_queries=40, cold_bins=16, colocate=True
    ),
    "hot/cold + 8 bins + co-located": CoDesign(
        hot_rows=1024, hot_queries=24, cold_bins=8, colocate=True
    ),
    "hot/cold + 32 bins + co-located": CoDesign(
        hot_rows=4096, hot_queries=32, cold_bins=32, colocate=True
    ),
    "hot/cold + 64 bins": CoDesign(hot_rows=2048, hot_queries=40, cold_bins=64),
    "hot/cold + 64 bins + co-located": CoDesign(
        hot_rows=2048, hot_queries=40, cold_bins=64, colocate=True
    ),
}


def ngram_codes(x: np.ndarray) -> np.ndarray:
    """Code of the byte 4-gram ending at each position; -1 where the window has fewer bytes."""
    codes = np.full(x.shape, -1, np.int64)
    acc = np.zeros_like(x[:, NGRAM - 1 :], dtype=np.int64)
    for k in range(NGRAM):
        acc = (acc << 8) | x[:, k : x.shape[1] - NGRAM + 1 + k]
    codes[:, NGRAM - 1 :] = acc
    return codes


class Vocab:
    """Row ids for 4-grams: 1 + frequency rank among the ROWS - 1 most frequent, 0 otherwise."""

    def __init__(self, train_codes: np.ndarray):
        codes, counts = np.unique(train_codes[train_codes >= 0], return_counts=True)
        top = codes[np.argsort(-counts, kind="stable")[: ROWS - 1]]
        self.order = np.argsort(top)
        self.sorted = top[self.order]

    def ids(self, codes: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(self.sorted, codes), 0, self.sorted.size - 1)
        hit = (self.sorted[pos] == codes) & (codes >= 0)
        return np.where(hit, self.order[pos] + 1, 0)


class NGramLM(nn.Module):
    """MobileLLM with a 4-gram embedding table added to its token embedding."""

    def __init__(self, config: str = "tiny"):
        super().__init__()
        self.lm = build_model(config)
        self.table = nn.Embedding(ROWS, DIM, padding_idx=0)
        nn.init.normal_(self.table.weight, std=0.02)
        self.proj = nn.Linear(DIM, self.lm.config.dim, bias=False)

    def forward(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        h = self.lm.embed(x) + self.proj(rows)
        h, _ = self.lm.run_layers(h, 0, self.lm.depth)
        return self.lm.logits(h)


def train(model: NGramLM, x: torch.Tensor, ids: torch.Tensor, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        b = torch.randint(0, x.shape[0], (32,), generator=g)
        keep = torch.rand(32, x.shape[1] - 1, generator=g) > 0.3  # drop rows, like PIR will
        rows = model.table(ids[b]) * keep[..., None]
        logits = model(x[b, :-1], rows)
        loss = F.cross_entropy(logits.flatten(0, 1), x[b, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # cosine decay
            group["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))


@torch.no_grad()
def perplexity(model: NGramLM, x: torch.Tensor, rows: torch.Tensor) -> float:
    model.eval()
    total, count = 0.0, 0
    for lo in range(0, x.shape[0], 128):
        logits = model(x[lo : lo + 128, :-1], rows[lo : lo + 128])
        y = x[lo : lo + 128, 1:]
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    return math.exp(total / count)


def server_seconds(servers: list[PIRServer], plans: list) -> tuple[float, float]:
    """One party's (wall, CPU) seconds to answer a batch of plans: every table, one pass each,
    all in one `answer_many` call. CPU seconds (all threads) measure the work itself,
    undisturbed by other jobs on the cores."""
    keys = [
        query(np.concatenate([p.queries[t] for p in plans]), server.spec.num_rows)[0]
        for t, server in enumerate(servers)
    ]
    start, start_cpu = time.perf_counter(), time.process_time()
    answer_many(servers, keys)
    return time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32, help="inferences per server batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per policy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/pir_codesign")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)

    corpus = MobileLLMTask(seed=args.seed, seq_len=64).corpus
    train_x, test_x = corpus.train, corpus.test
    train_codes = ngram_codes(train_x[:, :-1].numpy())
    vocab = Vocab(train_codes)
    train_ids = torch.from_numpy(vocab.ids(train_codes))
    test_ids = vocab.ids(ngram_codes(test_x[:, :-1].numpy()))
    counts = np.bincount(train_ids.reshape(-1).numpy(), minlength=ROWS).astype(np.int64)
    counts[0] = 0  # the unknown row is never fetched
    # successor[r]: the row that most often follows row r in the training text
    a, b = train_ids[:, :-1].reshape(-1).numpy(), train_ids[:, 1:].reshape(-1).numpy()
    pairs, n = np.unique(a * ROWS + b, return_counts=True)
    successor = np.arange(ROWS)
    best = np.zeros(ROWS, np.int64)
    for p, c in zip(pairs, n, strict=True):
        if c > best[p // ROWS] and p % ROWS:
            best[p // ROWS], successor[p // ROWS] = c, p % ROWS

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / f"ngram_lm_{args.steps}_steps_seed{args.seed}.pt"
    model = NGramLM()
    train_seconds = None
    if saved.exists():  # rerunning the policies need not retrain
        model.load_state_dict(torch.load(saved))
        print(f"loaded the model trained for {args.steps} steps from {saved}")
    else:
        start = time.time()
        train(model, train_x, train_ids, args.steps, args.seed)
        train_seconds = time.time() - start
        torch.save(model.state_dict(), saved)
        print(f"trained {args.steps} steps in {train_seconds:.0f} s")
    table = model.table.weight.detach().numpy().astype(np.float16)  # the served table, 64 B rows
    served = torch.from_numpy(table.astype(np.float32))

    test_rows = served[torch.from_numpy(test_ids)]
    ppl_all = perplexity(model, test_x, test_rows)
    ppl_none = perplexity(model, test_x, torch.zeros_like(test_rows))
    print(f"{len(test_x)} test windows")
    print(f"perplexity: all rows {ppl_all:.3f}, no rows {ppl_none:.3f}")

    results = []
    plain_rate = None
    for name, design in POLICIES.items():
        layout = Layout(counts, design, successor)
        plans = [layout.plan(ids[ids > 0], rng) for ids in test_ids]
        fetched = np.zeros(test_ids.shape, bool)
        for i, plan in enumerate(plans):
            fetched[i] = np.isin(test_ids[i], plan.fetched) | (test_ids[i] == 0)
        ppl = perplexity(model, test_x, test_rows * torch.from_numpy(fetched)[..., None])
        needed = test_ids > 0
        missed = float((~fetched & needed).sum() / needed.sum())

        tables = layout.tables(table)
        servers = serve_pair(tables)
        check = plans[: args.batch]
        got = fetch(layout, check, servers)  # real two-server PIR, bit-exact
        assert all(got[i].tobytes() == table[i].tobytes() for i in got)
        assert set(got) == set().union(*(set(p.fetched.tolist()) for p in check))
        server_seconds(servers[0], check)  # warm-up (numba, caches)
        times = []
        for _ in range(args.repeats):
            batch = [plans[j] for j in rng.integers(0, len(plans), args.batch)]
            times.append(server_seconds(servers[0], batch))
        rate = args.batch / min(cpu for _, cpu in times)
        wall_rate = args.batch / min(wall for wall, _ in times)
        plain_rate = plain_rate or rate
        row = {
            "policy": name,
            "tables": len(tables),
            "queries_per_inference": int(sum(layout.budget)),
            "kib_scanned_per_inference": layout.cost_rows() * tables[0][0].nbytes / 1024,
            "inferences_per_cpu_s": rate,
            "inferences_per_wall_s": wall_rate,
            "speedup": rate / plain_rate,
            "rows_missed": missed,
            "perplexity": ppl,
        }
        results.append(row)
        print(
            f"{name:34s} q/inf {row['queries_per_inference']:3d}  inf/cpu-s {rate:8.1f}  "
            f"x{row['speedup']:5.1f}  missed {missed:6.1%}  ppl {ppl:.3f}"
        )

    summary = {
        "steps": args.steps,
        "train_seconds": train_seconds,
        "test_windows": len(test_x),
        "perplexity_all_rows": ppl_all,
        "perplexity_no_rows": ppl_none,
        "batch": args.batch,
        "results": results,
    }
    (out / "pir_codesign.json").write_text(json.dumps(summary, indent=2))
    lines = [
        f"perplexity with every row: {ppl_all:.3f}; with no 4-gram rows: {ppl_none:.3f}",
        "",
        "| policy | queries/inference | KiB scanned/inference | inferences per CPU-s "
        "| (per wall-s) | speedup | rows not fetched | perplexity |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['policy']} | {r['queries_per_inference']} | "
            f"{r['kib_scanned_per_inference']:,.0f} | {r['inferences_per_cpu_s']:.1f} | "
            f"{r['inferences_per_wall_s']:.1f} | "
            f"{r['speedup']:.1f}x | {r['rows_missed']:.1%} | {r['perplexity']:.3f} |"
        )
    (out / "pir_codesign.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
