"""A device that does not hold the token-embedding table: it fetches the rows for its tokens
by two-server PIR and gets the same perplexity as with the local table.

Setup. A tiny MobileLLM decoder is trained briefly on Python's reference topics (byte tokens).
Its input embedding table is written to a temporary .npy file and served by two real
`fedge pir-server` processes (party 0 and 1, 127.0.0.1, free ports, stopped at the end). The
device model is the same model with its `embed_tokens` removed. For each text window (one
inference) the device sends a fixed number of queries, one per token position: the window's
distinct tokens, padded with dummy queries at random rows, so the servers learn neither which
rows nor how many distinct ones; `PrivateEmbeddingClient.fetch` reconstructs the rows, the
device gathers them into the window's input embeddings and runs the decoder from there.

Tied embeddings. MobileLLM shares the input and output embedding. The output head needs
every row of the table for every token (the softmax is over the whole vocabulary), so a device
with a tied head holds the whole table anyway, and fetching the input rows privately would
save nothing. This experiment therefore uses the tiny config with untied embeddings
(`tie_embeddings=False`): the LM head (vocab x dim) stays on the device; the input table does
not. For large vocabularies the head can itself be made smaller (a low-rank or clustered
head); that is out of scope here.

Exactness. PIR reconstruction XORs the two servers' answers, which gives back the table's
bytes exactly, so the device's input embeddings are bit-identical to the local lookup. The rest
is the same deterministic CPU computation on tensors of the same shapes, so the logits, and
thus the perplexity, are bit-identical too: the script checks exact (==) equality, no
tolerance.

    .venv/bin/python simulations/pir_embeddings.py --out runs/pir_embeddings
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedge.client.sdk import PrivateEmbeddingClient
from fedge.processes import pir_server_processes
from fedge.tasks.mobilellm.model import CONFIGS, Transformer, build_model, num_parameters
from fedge.tasks.mobilellm.model import perplexity as ppl
from fedge.tasks.mobilellm.task import MobileLLMTask

CONFIG = replace(CONFIGS["tiny"], tie_embeddings=False)


def train(task: MobileLLMTask, steps: int, batch: int = 16, lr: float = 3e-3) -> Transformer:
    """The untied tiny decoder after `steps` AdamW steps on random training windows."""
    torch.manual_seed(task.seed)
    model = build_model(CONFIG)
    data = task.train_dataset()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(task.seed)
    model.train()
    for _ in range(steps):
        x, y = data[torch.randint(len(data), (batch,), generator=gen)]
        loss = task.loss(model, (x, y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def device_copy(model: Transformer) -> Transformer:
    """The device's model: everything but the input embedding table."""
    device = build_model(CONFIG)
    device.load_state_dict(model.state_dict())
    device.embed_tokens = None  # any use of the table on the device now fails loudly
    return device.eval()


@torch.no_grad()
def mean_loss(model: Transformer, hidden: Tensor, targets: Tensor) -> float:
    """Mean next-token cross-entropy (nats) from input embeddings (windows, T, dim)."""
    h, _ = model.run_layers(hidden, 0, model.depth)
    return float(F.cross_entropy(model.logits(h).flatten(0, 1), targets.flatten()))


def query_plan(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """Row ids to query for windows x (windows, T): per window its distinct tokens, padded to T
    with dummies at random rows (a fixed budget hides how many tokens are distinct), and for
    each window the position of each token's row among its queries."""
    ids, where = [], []
    for w, window in enumerate(x):
        rows, inverse = np.unique(window, return_inverse=True)
        dummies = rng.integers(0, CONFIG.vocab_size, window.size - rows.size)
        ids.append(np.concatenate([rows, dummies]))
        where.append(w * window.size + inverse)
    return np.concatenate(ids), where


def run(steps: int, tokens: int, seq_len: int, seed: int) -> dict:
    task = MobileLLMTask(seed=seed, seq_len=seq_len)
    test = task.test_dataset()
    windows = max(1, tokens // seq_len)
    if windows > len(test):
        raise ValueError(f"--tokens {tokens}: the test text has only {len(test) * seq_len}")
    x, y = test[:windows]
    model = train(task, steps)
    table = model.embed_tokens.weight.detach().numpy()  # (vocab, dim) float32
    local = mean_loss(model, model.embed(x), y)

    device = device_copy(model)
    rng = np.random.default_rng(seed)
    ids, where = query_plan(x.numpy(), rng)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "embed_tokens.npy"
        np.save(path, table)
        start = time.perf_counter()
        with pir_server_processes(path) as addresses:
            started = time.perf_counter() - start
            with PrivateEmbeddingClient(addresses) as client:
                start = time.perf_counter()
                rows = client.fetch(ids)
                fetch_s = time.perf_counter() - start
                traffic = client.queries, client.bytes_sent, client.bytes_received
    exact_rows = rows.tobytes() == table[ids].tobytes()
    hidden = torch.from_numpy(np.stack([rows[w] for w in where]))
    private = mean_loss(device, hidden, y)
    distinct = [np.unique(window).size for window in x.numpy()]
    return {
        "steps": steps,
        "tokens": int(x.numel()),
        "windows": windows,
        "distinct_rows_per_window": float(np.mean(distinct)),
        "distinct_rows_total": int(np.unique(x.numpy()).size),
        "pir_queries": traffic[0],
        "bytes_up": traffic[1],
        "bytes_down": traffic[2],
        "table_bytes": table.nbytes,
        "row_bytes": table.shape[1] * table.itemsize,
        "server_start_s": started,
        "fetch_s": fetch_s,
        "rows_exact": exact_rows,
        "perplexity_local": ppl(local),
        "perplexity_pir": ppl(private),
        "perplexity_equal": ppl(local) == ppl(private),
        "model_parameters": num_parameters(model),
        "device_parameters": num_parameters(device),
    }


def markdown(r: dict) -> str:
    head = (
        "| tokens | distinct rows (per window / all) | PIR queries | bytes up | bytes down "
        "| fetch s | perplexity local | perplexity PIR | equal |"
    )
    return "\n".join(
        [
            head,
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {r['tokens']} | {r['distinct_rows_per_window']:.1f} / {r['distinct_rows_total']} "
            f"| {r['pir_queries']} | {r['bytes_up']:,} | {r['bytes_down']:,} "
            f"| {r['fetch_s']:.2f} | {r['perplexity_local']!r} | {r['perplexity_pir']!r} "
            f"| {'bit-exact' if r['perplexity_equal'] else 'NO'} |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps [200]")
    parser.add_argument("--tokens", type=int, default=512, help="test tokens to score [512]")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per window [64]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="folder for results.json and results.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    r = run(args.steps, args.tokens, args.seq_len, args.seed)
    table = markdown(r)
    print(table)
    print(
        f"rows bit-exact: {r['rows_exact']}; servers started in {r['server_start_s']:.1f} s; "
        f"device holds {r['device_parameters']:,} of {r['model_parameters']:,} parameters "
        f"(the {r['table_bytes']:,}-byte input table, {r['row_bytes']} B rows, is served)"
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(r, indent=2))
        (out / "results.md").write_text(table + "\n")
    if not (r["rows_exact"] and r["perplexity_equal"]):
        raise SystemExit("PIR rows or perplexity differ from the local table")


if __name__ == "__main__":
    main()
