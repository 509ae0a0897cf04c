"""LayerSkip on a tiny MobileLLM trained by federated simulation: early-exit quality,
self-speculative decoding speed (greedy and sampled), draft acceptance on held-out text, and
MobileLLM's depth and layer-sharing ablation.

    python simulations/layerskip_speedup.py --out runs/layerskip

1. Trains `tiny-deep` (16 layers, dim 64) with FedAvg over topic-group clients of the
   pydoc corpus (natural non-IID), once plainly and once with LayerSkip (layer dropout
   rising exponentially with depth and, as the paper does from scratch, over training
   steps; early-exit loss, rotational curriculum).
2. Picks each run's checkpoint at matched perplexity: the earliest round at or below the
   worse of the two final perplexities.
3. For each model and exit layer E: test perplexity at exit E; greedy decoding tokens/s,
   self-speculative (draft with layers < E, verify with the rest) against plain, checking
   that both emit the same tokens; the same with sampling at --temperature (the standard
   rejection step, so the output is distributed as plain sampling); and the fraction of
   drafts the full model keeps when exit E drafts on the true prefix of held-out text.
4. Ablation at equal parameters: deep-thin (16 x 64) against wide-shallow (4 x 128) at
   0.75M, and 6 x 64 blocks run once against twice (immediate block-wise layer sharing,
   MobileLLM-LS) at 0.29M.

Writes layerskip.md and layerskip.json into --out (plus each run's history) and prints the
sampling and held-out acceptance tables.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedge.config import RunConfig
from fedge.server.checkpoint import model_path
from fedge.simulation import simulate
from fedge.tasks.mobilellm.model import Transformer, generate, num_parameters
from fedge.tasks.mobilellm.speculative import heldout_acceptance, self_speculative_generate
from fedge.tasks.mobilellm.task import MobileLLMTask
from fedge.tasks.registry import build_task

LAYERSKIP = dict(
    layer_dropout=0.1,
    dropout_curriculum="exp",
    early_exit_scale=1.0,
    curriculum="rotational",
    rotation=2,
)


def run_config(args, name: str, options: dict) -> RunConfig:
    return RunConfig.from_mapping(
        dict(
            task="mobilellm",
            task_options={"seq_len": args.seq_len, **options},
            partition="natural",
            num_clients=args.clients,
            clients_per_round=args.clients,
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            momentum=0.9,
            eval_fraction=0.0,
            max_train_seconds=args.max_train_seconds,
            backend=args.backend,
            seed=args.seed,
            out=str(Path(args.out) / name),
        )
    )


def total_steps(args, options: dict) -> int:
    """T of the LayerSkip curricula: the SGD steps the run will take, all clients together
    (the in-process grid shares one task, so its step counter spans them)."""
    task = build_task("mobilellm", seed=args.seed, seq_len=args.seq_len, **options)
    per_epoch = math.ceil(len(task.train_dataset()) / args.batch_size) + args.clients
    return per_epoch * args.local_epochs * args.rounds


def train_federated(args, name: str, options: dict) -> tuple[MobileLLMTask, list[dict], float]:
    """FedAvg over topic-group clients; returns the task, the history (one record and one
    checkpoint per round) and the wall seconds."""
    cfg = run_config(args, name, options)
    start = time.perf_counter()
    history = simulate(cfg)
    task = build_task("mobilellm", seed=args.seed, **cfg.task_options)
    assert isinstance(task, MobileLLMTask)
    return task, history, time.perf_counter() - start


def load_round(args, name: str, task: MobileLLMTask, server_round: int) -> Transformer:
    model = task.build_model()
    state = torch.load(model_path(Path(args.out) / name, server_round), weights_only=True)
    model.load_state_dict(state)
    assert isinstance(model, Transformer)
    return model.eval()


def matched_rounds(histories: dict[str, list[dict]]) -> dict[str, int]:
    """Each run's earliest round at or below the worse final perplexity, so the runs are
    compared at (about) equal quality, not at equal steps."""
    target = max(h[-1]["perplexity"] for h in histories.values())
    return {
        name: next(r["round"] for r in h if r["perplexity"] <= target)
        for name, h in histories.items()
    }


def best_time(repeats: int, fn: Callable[..., Any], *fn_args: Any) -> tuple[float, Any]:
    """The fastest of `repeats` runs (the sandbox is shared) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*fn_args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def decode_rows(
    args, model: Transformer, label: str, prompts: list[torch.Tensor], temperature: float
) -> list[dict]:
    """Per exit layer and draft length: acceptance and tokens/s against plain decoding at
    this temperature (greedy at 0, where the outputs must be identical), and the speedup
    in layer passes, which the shared machine's load does not move: plain decoding runs L
    layers per token; a self-speculative step runs E layers for each of its k+1 positions
    and the L-E late layers once over all of them (the prefill is L for both)."""
    g = torch.Generator().manual_seed(args.seed)
    plain_s, plain_out = 0.0, []
    for p in prompts:
        seconds, out = best_time(args.repeats, generate, model, p, args.new_tokens, temperature, g)
        plain_s += seconds
        plain_out.append(out)
    tokens = args.new_tokens * len(prompts)
    rows = []
    for exit_layer in args.exits:
        for k in args.num_draft:
            spec_s, drafted, accepted, steps, identical = 0.0, 0, 0, 0, True
            for p, ref in zip(prompts, plain_out, strict=True):
                seconds, (out, stats) = best_time(
                    args.repeats,
                    self_speculative_generate,
                    *(model, p, args.new_tokens, exit_layer, k, temperature, g),
                )
                spec_s += seconds
                drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
                steps += stats.verify_passes
                identical &= bool(torch.equal(out, ref))
            depth = model.depth
            spec_passes = len(prompts) * depth + (drafted + steps) * exit_layer
            spec_passes += steps * (depth - exit_layer)
            rows.append(
                {
                    "model": label,
                    "temperature": temperature,
                    "exit": exit_layer,
                    "num_draft": k,
                    "acceptance": accepted / max(drafted, 1),
                    "plain_tok_s": tokens / plain_s,
                    "spec_tok_s": tokens / spec_s,
                    "speedup": plain_s / spec_s,
                    "layer_speedup": len(prompts) * args.new_tokens * depth / spec_passes,
                    "identical": identical,
                }
            )
            print(_row_line(rows[-1]), flush=True)
    return rows


def heldout_rows(
    args, task: MobileLLMTask, model: Transformer, label: str, server_round: int
) -> list[dict]:
    """Per exit: perplexity there and the share of drafts the full model keeps when the exit
    drafts after true held-out prefixes, greedy and sampled."""
    test = task.test_dataset()
    exits = task.evaluate_exits(model, test)
    step = max(len(test) // args.heldout_windows, 1)
    windows = torch.stack([test[i * step][0] for i in range(min(args.heldout_windows, len(test)))])
    rows = []
    for exit_layer in args.exits:
        g = torch.Generator().manual_seed(args.seed)
        k, lens = args.heldout_draft, args.prefix_lens
        rows.append(
            {
                "model": label,
                "round": server_round,
                "exit": exit_layer,
                "num_draft": k,
                "exit_ppl": exits[exit_layer]["perplexity"],
                "final_ppl": exits[model.depth]["perplexity"],
                "greedy": heldout_acceptance(model, windows, exit_layer, k, lens),
                "sampled": heldout_acceptance(
                    model, windows, exit_layer, k, lens, args.temperature, g
                ),
            }
        )
        r = rows[-1]
        print(
            f"{label:<10} E={exit_layer:>2} ppl@E {r['exit_ppl']:7.2f}  held-out acceptance "
            f"greedy {r['greedy']:.3f}  sampled {r['sampled']:.3f}",
            flush=True,
        )
    return rows


def _row_line(r: dict) -> str:
    return (
        f"{r['model']:<10} T={r['temperature']} E={r['exit']:>2} k={r['num_draft']}  "
        f"accept {r['acceptance']:.2f}  {r['plain_tok_s']:6.1f} -> {r['spec_tok_s']:6.1f} tok/s  "
        f"x{r['speedup']:.2f}  layer passes x{r['layer_speedup']:.2f}  identical={r['identical']}"
    )


def decode_table(rows: list[dict], greedy: bool) -> list[str]:
    head = "| model | exit E | drafts k | acceptance while decoding | plain tok/s | "
    head += "self-spec tok/s | speedup | speedup in layer passes |"
    head += " identical output |" if greedy else ""
    lines = [head, "|---|---|---|---|---|---|---|---|" + ("---|" if greedy else "")]
    for r in rows:
        same = f" {'yes' if r['identical'] else 'NO'} |" if greedy else ""
        lines.append(
            f"| {r['model']} | {r['exit']} | {r['num_draft']} | {r['acceptance']:.2f} | "
            f"{r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | {r['speedup']:.2f}x | "
            f"{r['layer_speedup']:.2f}x |{same}"
        )
    return lines


def heldout_table(args, rows: list[dict]) -> list[str]:
    lines = [
        f"| model | round | final ppl | exit E | ppl at E | greedy acceptance (k = "
        f"{args.heldout_draft}) | sampled acceptance (T = {args.temperature}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['round']} | {r['final_ppl']:.2f} | {r['exit']} | "
            f"{r['exit_ppl']:.2f} | {r['greedy']:.3f} | {r['sampled']:.3f} |"
        )
    return lines


def markdown(args, res: dict) -> str:
    cmd = "python simulations/layerskip_speedup.py " + " ".join(sys.argv[1:])
    matched = ", ".join(
        f"{name} at round {r} (perplexity {res['histories'][name][r - 1]['perplexity']:.2f})"
        for name, r in res["matched"].items()
    )
    lines = [
        "# MobileLLM + LayerSkip at tiny scale",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: 2-core CPU sandbox (shared), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), Python {platform.python_version()}.  ",
        f"Training: FedAvg, {args.clients} topic-group clients of `pydoc_data.topics` "
        f"(natural non-IID), {args.rounds} rounds x {args.local_epochs} local epoch(s), "
        f"SGD lr {args.lr} momentum 0.9, batch {args.batch_size} x {args.seq_len} bytes; "
        f"LayerSkip {res['layerskip']}.  ",
        f"Compared at matched perplexity: {matched}.  ",
        f"Decoding: {args.prompts} test prompts of {args.prompt_len} bytes, "
        f"{args.new_tokens} new tokens each, best of {args.repeats} timings.",
        "",
        f"## Self-speculative decoding per exit layer (`{args.config}`)",
        "",
        "Greedy:",
        "",
        *decode_table(res["greedy"], greedy=True),
        "",
        f"Sampling at temperature {args.temperature} (the rejection step keeps the full "
        "model's distribution; outputs differ from plain sampling's draws, not in law):",
        "",
        *decode_table(res["sampled"], greedy=False),
        "",
        "## Draft acceptance on held-out text",
        "",
        f"{args.heldout_windows} test windows, exit E drafts {args.heldout_draft} tokens "
        f"after the true first {args.prefix_lens} bytes; the share the full model keeps:",
        "",
        *heldout_table(args, res["heldout"]),
    ]
    if res["ablation"]:
        lines += [
            "",
            "## Ablation: depth and layer sharing at about equal parameters",
            "",
            "| model | layers x dim | effective depth | parameters | test perplexity | train s |",
            "|---|---|---|---|---|---|",
        ]
        for r in res["ablation"]:
            lines.append(
                f"| {r['model']} | {r['shape']} | {r['depth']} | {r['params'] / 1e6:.3f}M | "
                f"{r['perplexity']:.2f} | {r['seconds']:.0f} |"
            )
    lines += ["", f"## Greedy samples (prompt + {args.new_tokens} generated bytes)", ""]
    for name, text in res["samples"].items():
        lines += [f"{name}:", "", "```", text, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", default="runs/layerskip")
    ap.add_argument("--config", default="tiny-deep", help="model config of both runs")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--max-train-seconds", type=float, default=0.0, help="per client per round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="local", help="simulation engine (see fedge run --help)")
    ap.add_argument("--exits", type=int, nargs="+", default=[2, 4, 6, 8, 12])
    ap.add_argument("--num-draft", type=int, nargs="+", default=[3, 6])
    ap.add_argument("--temperature", type=float, default=1.0, help="of the sampling tables")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--heldout-windows", type=int, default=256)
    ap.add_argument("--heldout-draft", type=int, default=4, help="drafts k on held-out text")
    ap.add_argument("--prefix-lens", type=int, nargs="+", default=[16, 32, 48])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-ablation", action="store_true")
    args = ap.parse_args(argv)
    if args.temperature <= 0:
        ap.error("--temperature must be > 0 (greedy is measured anyway)")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    base = {"config": args.config}
    layerskip = {**base, **LAYERSKIP}
    layerskip["curriculum_steps"] = total_steps(args, layerskip)
    runs = [("plain", base), ("layerskip", layerskip)]
    if not args.skip_ablation:
        runs += [
            ("wide", {"config": "tiny-wide"}),
            ("shallow", {"config": "tiny"}),
            ("shallow-LS", {"config": "tiny-LS"}),
        ]
    res: dict[str, Any] = {"layerskip": layerskip, "histories": {}, "ablation": []}
    tasks: dict[str, MobileLLMTask] = {}
    for name, options in runs:
        print(f"== training {name}: {options}", flush=True)
        task, history, seconds = train_federated(args, name, options)
        model = load_round(args, name, task, history[-1]["round"])
        cfg = model.config
        res["ablation"].append(
            {
                "model": f"{name} ({options['config']})",
                "shape": f"{cfg.n_layer} x {cfg.dim}",
                "depth": cfg.depth,
                "params": num_parameters(model),
                "perplexity": history[-1]["perplexity"],
                "seconds": seconds,
            }
        )
        print(f"   test perplexity {history[-1]['perplexity']:.2f} in {seconds:.0f} s")
        if name in ("plain", "layerskip"):
            tasks[name] = task
            res["histories"][name] = history
    if args.skip_ablation:
        res["ablation"] = []

    res["matched"] = matched_rounds(res["histories"])
    res |= {"greedy": [], "sampled": [], "heldout": [], "samples": {}}
    for name, server_round in res["matched"].items():
        task = tasks[name]
        model = load_round(args, name, task, server_round)
        print(f"== {name} at round {server_round}", flush=True)
        test = task.test_dataset()
        step = max(len(test) // args.prompts, 1)
        prompts = [test[i * step][0][None, : args.prompt_len] for i in range(args.prompts)]
        res["heldout"] += heldout_rows(args, task, model, name, server_round)
        text = torch.cat([prompts[0][0], generate(model, prompts[0], args.new_tokens)])
        res["samples"][name] = task.tokenizer.decode(text)
        res["greedy"] += decode_rows(args, model, name, prompts, 0.0)
        res["sampled"] += decode_rows(args, model, name, prompts, args.temperature)
    (out / "layerskip.json").write_text(
        json.dumps({"args": vars(args), **res}, indent=2, default=str)
    )
    (out / "layerskip.md").write_text(markdown(args, res))
    print("\n" + "\n".join(decode_table(res["sampled"], greedy=False)))
    print("\n" + "\n".join(heldout_table(args, res["heldout"])))
    print(f"wrote {out / 'layerskip.md'}")


if __name__ == "__main__":
    main()
