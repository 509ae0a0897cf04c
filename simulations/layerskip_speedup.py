"""LayerSkip on a tiny MobileLLM trained by federated simulation: early-exit quality,
self-speculative decoding speed, and MobileLLM's depth and layer-sharing ablation.

    python simulations/layerskip_speedup.py --out runs/layerskip

1. Trains `tiny-deep` (16 layers, dim 64) with FedAvg over topic-group clients of the
   pydoc corpus (natural non-IID), once plainly and once with LayerSkip (layer dropout
   rising exponentially with depth + early-exit loss, rotational curriculum).
2. For each model and exit layer E: test perplexity at exit E, the draft acceptance rate,
   and greedy decoding tokens/s, self-speculative (draft with layers < E, verify with the
   rest) against plain, checking that both emit the same tokens.
3. Ablation at equal parameters: deep-thin (16 x 64) against wide-shallow (4 x 128) at
   0.75M, and 6 x 64 blocks run once against twice (immediate block-wise layer sharing,
   MobileLLM-LS) at 0.29M.

Writes layerskip.md and layerskip.json into --out (plus each run's history).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from fedge.config import RunConfig
from fedge.simulation import simulate
from fedge.tasks.mobilellm.layerskip import self_speculative_generate
from fedge.tasks.mobilellm.model import generate, num_parameters
from fedge.tasks.mobilellm.task import MobileLLMTask
from fedge.tasks.registry import build_task

LAYERSKIP = dict(layer_dropout=0.1, early_exit_scale=1.0, curriculum="rotational", rotation=2)


def train_federated(args, name: str, options: dict) -> tuple[MobileLLMTask, torch.nn.Module, dict]:
    """FedAvg over topic-group clients; returns the task, the final global model, and the
    last round's record."""
    options = {"seq_len": args.seq_len, **options}
    cfg = RunConfig.from_mapping(
        dict(
            task="mobilellm",
            task_options=options,
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
    start = time.perf_counter()
    history = simulate(cfg)
    task = build_task("mobilellm", seed=args.seed, **options)
    model = task.build_model()
    model.load_state_dict(torch.load(Path(cfg.out) / "final_model.pt", weights_only=True))
    last = {**history[-1], "wall_seconds": time.perf_counter() - start}
    return task, model.eval(), last


def best_time(repeats: int, fn, *fn_args) -> tuple[float, object]:
    """The fastest of `repeats` runs (the sandbox is shared) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*fn_args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def speed_rows(args, task: MobileLLMTask, model, label: str) -> list[dict]:
    """Per exit layer: exit perplexity, acceptance, tokens/s against plain greedy."""
    test = task.test_dataset()
    step = max(len(test) // args.prompts, 1)
    prompts = [test[i * step][0][None, : args.prompt_len] for i in range(args.prompts)]
    exits = task.evaluate_exits(model, test)
    plain_s, plain_out = 0.0, []
    for p in prompts:
        seconds, out = best_time(args.repeats, generate, model, p, args.new_tokens)
        plain_s += seconds
        plain_out.append(out)
    tokens = args.new_tokens * len(prompts)
    rows = []
    for exit_layer in args.exits:
        for k in args.num_draft:
            spec_s, drafted, accepted, identical = 0.0, 0, 0, True
            for p, ref in zip(prompts, plain_out, strict=True):
                seconds, (out, stats) = best_time(
                    args.repeats,
                    self_speculative_generate,
                    model,
                    p,
                    args.new_tokens,
                    exit_layer,
                    k,
                )
                spec_s += seconds
                drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
                identical &= bool(torch.equal(out, ref))
            rows.append(
                {
                    "model": label,
                    "exit": exit_layer,
                    "num_draft": k,
                    "exit_ppl": exits[exit_layer]["perplexity"],
                    "final_ppl": exits[model.depth]["perplexity"],
                    "agreement": exits[exit_layer]["agreement"],
                    "acceptance": accepted / max(drafted, 1),
                    "plain_tok_s": tokens / plain_s,
                    "spec_tok_s": tokens / spec_s,
                    "speedup": plain_s / spec_s,
                    "identical": identical,
                }
            )
            print(_row_line(rows[-1]), flush=True)
    sample = task.tokenizer.decode(torch.cat([prompts[0][0], plain_out[0]]))
    rows[-1]["sample"] = sample
    return rows


def _row_line(r: dict) -> str:
    return (
        f"{r['model']:<10} E={r['exit']:>2} k={r['num_draft']}  ppl@E {r['exit_ppl']:7.2f}  "
        f"agree {r['agreement']:.2f}  "
        f"accept {r['acceptance']:.2f}  {r['plain_tok_s']:6.1f} -> {r['spec_tok_s']:6.1f} tok/s  "
        f"x{r['speedup']:.2f}  identical={r['identical']}"
    )


def markdown(args, speed: list[dict], ablation: list[dict], samples: dict[str, str]) -> str:
    cmd = "python simulations/layerskip_speedup.py " + " ".join(sys.argv[1:])
    lines = [
        "# MobileLLM + LayerSkip at tiny scale",
        "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: 2-core CPU sandbox (shared), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), Python {platform.python_version()}.  ",
        f"Training: FedAvg, {args.clients} topic-group clients of `pydoc_data.topics` "
        f"(natural non-IID), {args.rounds} rounds x {args.local_epochs} local epoch(s), "
        f"SGD lr {args.lr} momentum 0.9, batch {args.batch_size} x {args.seq_len} bytes.  ",
        f"Decoding: greedy, {args.prompts} test prompts of {args.prompt_len} bytes, "
        f"{args.new_tokens} new tokens each, best of {args.repeats} timings.",
        "",
        "## Self-speculative decoding per exit layer (`tiny-deep`, 16 layers)",
        "",
        "| model | exit E | drafts k | ppl at E | final ppl | agreement on test text | "
        "acceptance | plain tok/s | self-spec tok/s | speedup | identical output |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in speed:
        lines.append(
            f"| {r['model']} | {r['exit']} | {r['num_draft']} | {r['exit_ppl']:.2f} | "
            f"{r['final_ppl']:.2f} | {r['agreement']:.2f} | {r['acceptance']:.2f} | "
            f"{r['plain_tok_s']:.1f} | "
            f"{r['spec_tok_s']:.1f} | {r['speedup']:.2f}x | {'yes' if r['identical'] else 'NO'} |"
        )
    lines += [
        "",
        "## Ablation: depth and layer sharing at about equal parameters",
        "",
        "| model | layers x dim | effective depth | parameters | test perplexity | train s |",
        "|---|---|---|---|---|---|",
    ]
    for r in ablation:
        lines.append(
            f"| {r['model']} | {r['shape']} | {r['depth']} | {r['params'] / 1e6:.3f}M | "
            f"{r['perplexity']:.2f} | {r['seconds']:.0f} |"
        )
    lines += ["", "## Greedy samples (prompt + 96 generated bytes)", ""]
    for name, text in samples.items():
        lines += [f"{name}:", "", "```", text, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/layerskip")
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
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-ablation", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    speed, ablation, samples = [], [], {}
    runs = [("plain", {"config": "tiny-deep"}), ("layerskip", {"config": "tiny-deep", **LAYERSKIP})]
    if not args.skip_ablation:
        runs += [
            ("wide", {"config": "tiny-wide"}),
            ("shallow", {"config": "tiny"}),
            ("shallow-LS", {"config": "tiny-LS"}),
        ]
    for name, options in runs:
        print(f"== training {name}: {options}", flush=True)
        task, model, last = train_federated(args, name, options)
        cfg = model.config
        ablation.append(
            {
                "model": f"{name} ({options['config']})",
                "shape": f"{cfg.n_layer} x {cfg.dim}",
                "depth": cfg.depth,
                "params": num_parameters(model),
                "perplexity": last["perplexity"],
                "seconds": last["wall_seconds"],
            }
        )
        print(f"   test perplexity {last['perplexity']:.2f} in {last['wall_seconds']:.0f} s")
        if name in ("plain", "layerskip"):
            rows = speed_rows(args, task, model, name)
            samples[name] = rows[-1].pop("sample")
            speed += rows
    if args.skip_ablation:
        ablation = []
    (out / "layerskip.json").write_text(
        json.dumps({"args": vars(args), "speed": speed, "ablation": ablation}, indent=2)
    )
    (out / "layerskip.md").write_text(markdown(args, speed, ablation, samples))
    print(f"wrote {out / 'layerskip.md'}")


if __name__ == "__main__":
    main()
