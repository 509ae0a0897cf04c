"""Reproduce Zhao et al. 2018, "Federated Learning with Non-IID Data", at sandbox scale.

One command runs, on digits (real MNIST images, offline) and keyword spotting (synthetic
espeak-ng speakers):
  1. IID vs 2-class vs 1-class non-IID (FedAvg);
  2. 1-class with a globally shared subset G, alpha in {0.05, 0.1, 0.2}, beta = 1, warm-up on G;
  3. FedAvg vs FedProx vs SCAFFOLD vs FedNova at 1-class;
  4. weight divergence against EMD across partitions, with Spearman's rho.
It writes Markdown tables (zhao_tables.md) with the paper's numbers side by side and PNG plots;
docs/results/zhao.md quotes them with the analysis.

    .venv/bin/python simulations/zhao_noniid.py --out docs/results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

from fedge.config import RunConfig
from fedge.server.app import simulate

# What the paper reports (Zhao et al. 2018, abstract and Sec. 3-4): the largest accuracy
# drop of FedAvg under 1-class non-IID data, in points, and the gain from shared data.
PAPER_DROP = {"digits": "11 (MNIST, full 60k images)", "kws": "~55 (Speech Commands)"}
PAPER_SHARED = "CIFAR-10 1-class: +~30 points with 5% shared data (beta = 1)"
LABELS = {"iid": "IID", "label-k:2": "2-class non-IID", "label-k:1": "1-class non-IID"}
DIVERGENCE_PARTITIONS = [
    "iid",
    "dirichlet:1.0",
    "dirichlet:0.3",
    "dirichlet:0.1",
    "label-k:2",
    "label-k:1",
]


def scale(task: str, quick: bool) -> dict[str, Any]:
    """Run settings and which comparisons to make, per task (sized for a 2-core sandbox).

    Zhao: 10 clients, B=10, E=1, lr 0.01 decaying 0.995 a round, plain SGD. Digits keeps
    10 clients, B=10, E=1 and the decay; with 360 images a client (Zhao: 6,000) it uses
    lr 0.02 with momentum 0.5 to learn in 15 rounds. KWS (a small streaming transformer)
    uses the ASR helper's federated settings (lr 0.02, momentum 0.9, B=8, E=3).
    """
    base = dict(
        num_clients=10, local_epochs=1, lr_decay=0.995, eval_fraction=0.0, seed=0, backend="local"
    )
    if task == "digits":
        run = dict(
            base, task="digits", rounds=3 if quick else 15, lr=0.02, batch_size=10, momentum=0.5
        )
        return {
            "run": run,
            "alphas": (0.05, 0.1, 0.2),
            "strategies": ("fedprox", "scaffold", "fednova"),
            "div_rounds": 2,
        }
    options = dict(speakers=12, test_speakers=4, copies=3, n_layer=2, energy_reports=False)
    run = dict(
        base,
        task="kws",
        task_options=options,
        rounds=3 if quick else 15,
        lr=0.02,
        batch_size=8,
        momentum=0.9,
        local_epochs=3,
    )
    return {"run": run, "alphas": (0.05,), "strategies": (), "div_rounds": 1}


def run(name: str, out: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    started = time.perf_counter()
    history = simulate(RunConfig.from_mapping({**settings, "out": str(out / name)}))
    last = history[-1]
    print(
        f"[{time.strftime('%H:%M:%S')}] {name}: accuracy {last['accuracy']:.4f}, "
        f"emd_mean {last.get('emd_mean', float('nan')):.3f}, "
        f"divergence {last.get('divergence', float('nan')):.4f}, "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return history


def experiments(
    task: str, quick: bool, runs: Path, div_rounds: int = 0, only_divergence: bool = False
) -> dict[str, list[dict[str, Any]]]:
    """Every federated run of one task, keyed by setting name."""
    plan = scale(task, quick)
    base = plan["run"]
    results: dict[str, list[dict[str, Any]]] = {}
    for part in () if only_divergence else ("iid", "label-k:2", "label-k:1"):
        results[part] = run(f"{task}-{part}", runs, {**base, "partition": part})
    for alpha in () if only_divergence else plan["alphas"]:
        settings = {**base, "partition": "label-k:1", "shared_fraction": alpha, "warmup_epochs": 5}
        results[f"label-k:1+G{alpha}"] = run(f"{task}-1class-G{alpha}", runs, settings)
    if not only_divergence and plan["alphas"]:  # G mixed in, without the warm-up on G
        settings = {**base, "partition": "label-k:1", "shared_fraction": plan["alphas"][0]}
        key = f"label-k:1+G{plan['alphas'][0]}/no-warm-up"
        results[key] = run(f"{task}-1class-G{plan['alphas'][0]}-nowarm", runs, settings)
    for strategy in () if only_divergence else plan["strategies"]:
        settings = {**base, "partition": "label-k:1", "strategy": strategy}
        results[f"label-k:1/{strategy}"] = run(f"{task}-1class-{strategy}", runs, settings)
    for part in DIVERGENCE_PARTITIONS:
        settings = {
            **base,
            "partition": part,
            "rounds": div_rounds or plan["div_rounds"],
            "track_divergence": True,
        }
        results[f"div/{part}"] = run(f"{task}-div-{part}", runs, settings)
    return results


def pct(history: list[dict[str, Any]]) -> float:
    return 100 * history[-1]["accuracy"]


def table(task: str, results: dict[str, list[dict[str, Any]]]) -> tuple[str, dict[str, float]]:
    """Markdown rows for one task and the headline numbers."""
    iid, one = pct(results["iid"]), pct(results["label-k:1"])
    rounds = len(results["iid"])
    lines = [
        f"### {task} ({rounds} rounds)",
        "",
        "| setting | EMD (mean) | accuracy (%), last round | mean of last 3 | change vs IID |"
        " paper |",
        "|---|---|---|---|---|---|",
    ]
    for key, history in results.items():
        if key.startswith("div/"):
            continue
        label = LABELS.get(key, key.replace("label-k:1", "1-class"))
        emd = history[-1].get("emd_mean")
        shown = f"{emd:.2f}" if emd is not None else "n/a"
        ref = {"label-k:1": f"-{PAPER_DROP[task]}", "label-k:1+G0.05": PAPER_SHARED}.get(key, "")
        last3 = sum(100 * r["accuracy"] for r in history[-3:]) / len(history[-3:])
        lines.append(
            f"| {label} | {shown} | {pct(history):.1f} | {last3:.1f} | {pct(history) - iid:+.1f}"
            f" | {ref} |"
        )
    drop = iid - one
    g5 = pct(results["label-k:1+G0.05"])
    recovered = (g5 - one) / drop if drop > 0 else float("nan")
    div = [
        (results[f"div/{p}"][-1]["emd_mean"], results[f"div/{p}"][-1]["divergence"])
        for p in DIVERGENCE_PARTITIONS
    ]
    rho = float(spearmanr([d[0] for d in div], [d[1] for d in div]).statistic)
    div_rounds = len(results["div/iid"])
    lines += [
        "",
        f"| partition | EMD (mean) | weight divergence after {div_rounds} rounds (whole model) |",
        "|---|---|---|",
    ]
    lines += [
        f"| {p} | {e:.3f} | {d:.4f} |" for p, (e, d) in zip(DIVERGENCE_PARTITIONS, div, strict=True)
    ]
    lines += [
        "",
        f"- 1-class drop: {drop:.1f} points (paper: {PAPER_DROP[task]}); 5% shared data "
        f"recovers {100 * recovered:.0f}% of it (expected >= 50%; paper: {PAPER_SHARED}).",
        f"- Spearman rho(EMD, weight divergence after {div_rounds} rounds) = {rho:.2f} "
        "(expected >= 0.8).",
        "",
    ]
    return "\n".join(lines), {"drop": drop, "recovered": recovered, "spearman": rho}


def plots(task: str, results: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    groups = [
        ("partition (FedAvg)", ["iid", "label-k:2", "label-k:1"]),
        ("1-class + shared G", ["label-k:1"] + [k for k in results if "+G" in k]),
        ("1-class, strategy", ["label-k:1"] + [k for k in results if k.startswith("label-k:1/")]),
    ]
    for ax, (title, keys) in zip(axes, groups, strict=True):
        for key in keys:
            h = results[key]
            label = "fedavg" if (key == "label-k:1" and "strategy" in title) else key
            ax.plot(
                [r["round"] for r in h], [100 * r["accuracy"] for r in h], marker=".", label=label
            )
        ax.set_title(f"{task}: {title}", fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    acc = out / f"zhao_{task}_accuracy.png"
    fig.savefig(acc, dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for p in DIVERGENCE_PARTITIONS:
        r = results[f"div/{p}"][-1]
        ax.scatter(r["emd_mean"], r["divergence"])
        ax.annotate(p, (r["emd_mean"], r["divergence"]), fontsize=7)
    ax.set_xlabel("EMD (n_k-weighted mean)")
    ax.set_ylabel("weight divergence")
    ax.set_title(f"{task}: divergence vs EMD", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    div = out / f"zhao_{task}_divergence.png"
    fig.savefig(div, dpi=80)
    plt.close(fig)
    return [acc, div]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,kws", help="comma-separated: digits, kws")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller KWS data")
    parser.add_argument(
        "--out", default="docs/results", help="folder for zhao_tables.md and the plots"
    )
    parser.add_argument("--runs", default="runs/zhao", help="folder for the runs' histories")
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild tables and plots from --runs"
    )
    parser.add_argument(
        "--div-rounds", type=int, default=0, help="rounds of the divergence sweep (0: default)"
    )
    parser.add_argument(
        "--divergence-only",
        action="store_true",
        help="rerun only the divergence sweep, keeping the other saved runs",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    sections, summary = [], {}
    for task in args.tasks.split(","):
        saved = runs / f"{task}-results.json"
        if args.report_only:
            results = json.loads(saved.read_text())
        else:
            results = json.loads(saved.read_text()) if args.divergence_only else {}
            results.update(
                experiments(task, args.quick, runs, args.div_rounds, args.divergence_only)
            )
            saved.write_text(json.dumps(results))
        text, summary[task] = table(task, results)
        pngs = plots(task, results, out)
        sections.append(text + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n")
        print(text, flush=True)
    (runs / "summary.json").write_text(json.dumps(summary, indent=2))
    command = "python simulations/zhao_noniid.py " + " ".join(sys.argv[1:])
    header = f"Command (2-core CPU sandbox, shared with other jobs): `{command}`\n\n"
    (out / "zhao_tables.md").write_text(header + "\n".join(sections))


if __name__ == "__main__":
    main()
