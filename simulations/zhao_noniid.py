"""Reproduce Zhao et al. 2018, "Federated Learning with Non-IID Data", at sandbox scale.

One command runs, on digits (real MNIST images, offline) and keyword spotting (synthetic
espeak-ng speakers), everything the reproduction reports:
  1. weight divergence against EMD across partitions (Spearman's rho), several seeds, from a
     cold (random) and a warm (pre-trained on held-out data) start, against the mean of
     several centralized SGD replicas, with SGD's own noise floor;
  2. IID vs 2-class vs 1-class non-IID accuracy (FedAvg);
  3. 1-class with a globally shared subset G, alpha in {0.05, 0.1, 0.2}, beta = 1, warm-up;
  4. FedAvg vs FedProx vs SCAFFOLD vs FedNova at 1-class.
It writes `zhao_tables.md` (tables with the paper's numbers side by side) and PNG plots into
--out. Every run lives in its own folder under --runs; a run whose history is complete and
whose config matches is skipped, so an interrupted command continues where it stopped.

    nice -n 10 .venv/bin/python simulations/zhao_noniid.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from fedge.config import RunConfig
from fedge.data.divergence import (
    fedavg_steps,
    mean_state,
    relative_distance,
    run_federation,
    sgd_noise,
    sgd_replicas,
    shadow_sgd,
    warm_up,
    weight_divergence,
)
from fedge.data.shared import client_split
from fedge.simulation import simulate
from fedge.tasks import build_task

# What the paper reports (Zhao et al. 2018, abstract and Sec. 3-4): the largest accuracy
# drop of FedAvg under 1-class non-IID data, in points, and the gain from shared data.
PAPER_DROP = {"digits": "11 (MNIST, full 60k images)", "kws": "~55 (Speech Commands)"}
PAPER_SHARED = "CIFAR-10 1-class: +~30 points with 5% shared data (beta = 1)"
LABELS = {"iid": "IID", "label-k:2": "2-class non-IID", "label-k:1": "1-class non-IID"}
STRATEGIES = ("fedprox", "scaffold", "fednova")
ALPHAS = (0.05, 0.1, 0.2)
# The headline settings also run with more seeds (key@seedN), for a spread on the drop.
HEADLINE = ("iid", "label-k:2", "label-k:1", "label-k:1+G0.05")
ACC_SEEDS = (0, 1, 2)
# The divergence sweep: partitions spread along the EMD axis, several seeds each.
DIV_PARTITIONS = (
    "iid",
    "dirichlet:1.0",
    "dirichlet:0.5",
    "dirichlet:0.2",
    "dirichlet:0.1",
    "dirichlet:0.05",
    "label-k:3",
    "label-k:2",
    "label-k:1",
)
DIV_SEEDS = (0, 1, 2)
DIV_ROUNDS = 3
SGD_REPLICAS = 4
# Warm start: the initial model is first trained briefly on a held-out 20% of the data (G
# with beta = 0: the clients never see it), past the first steps from a random init, where
# SGD's own noise is largest (KWS), and far from converged (digits: 18% accuracy after it).
STARTS = ("cold", "warm")
WARMUP_EPOCHS = {"digits": 1, "kws": 3}


def start_settings(task: str, start: str) -> dict[str, Any]:
    """Extra run settings of a divergence run's starting point."""
    if start == "cold":
        return {}
    return dict(shared_fraction=0.25, shared_per_client=0.0, warmup_epochs=WARMUP_EPOCHS[task])


def base_settings(task: str, quick: bool) -> dict[str, Any]:
    """Run settings per task (sized for a 2-core sandbox).

    Zhao: 10 clients, B=10, E=1, lr 0.01 decaying 0.995 a round, plain SGD. Digits keeps
    10 clients, B=10, E=1 and the decay; with 360 images a client (Zhao: 6,000) it uses
    lr 0.02 with momentum 0.5 to learn in 15 rounds. KWS (a small streaming transformer)
    uses the ASR helper's federated settings (lr 0.02, momentum 0.9, B=8, E=3).
    """
    base = dict(
        num_clients=10, local_epochs=1, lr_decay=0.995, eval_fraction=0.0, seed=0, backend="local"
    )
    rounds = 3 if quick else 15
    if task == "digits":
        return dict(base, task="digits", rounds=rounds, lr=0.02, batch_size=10, momentum=0.5)
    if task == "kws":
        options = dict(speakers=12, test_speakers=4, copies=3, n_layer=2, energy_reports=False)
        return dict(
            base,
            task="kws",
            task_options=options,
            rounds=rounds,
            lr=0.02,
            batch_size=8,
            momentum=0.9,
            local_epochs=3,
        )
    raise ValueError(f"unknown task {task!r}; use digits or kws")


def accuracy_plan(task: str, base: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """setting -> (run folder name, settings) for the accuracy comparisons."""
    one = {**base, "partition": "label-k:1"}
    plan = {p: (f"{task}-{p}", {**base, "partition": p}) for p in ("iid", "label-k:2")}
    plan["label-k:1"] = (f"{task}-label-k:1", one)
    for alpha in ALPHAS:
        g = {**one, "shared_fraction": alpha, "warmup_epochs": 5}
        plan[f"label-k:1+G{alpha}"] = (f"{task}-1class-G{alpha}", g)
    for s in STRATEGIES:
        plan[f"label-k:1/{s}"] = (f"{task}-1class-{s}", {**one, "strategy": s})
    no_warm = {**one, "shared_fraction": ALPHAS[0]}
    plan[f"label-k:1+G{ALPHAS[0]}/no-warm-up"] = (f"{task}-1class-G{ALPHAS[0]}-nowarm", no_warm)
    for seed in ACC_SEEDS[1:]:
        for key in HEADLINE:
            name, settings = plan[key]
            plan[f"{key}@seed{seed}"] = (f"{name}-s{seed}", {**settings, "seed": seed})
    return plan


def divergence_plan(
    task: str, base: dict[str, Any], quick: bool
) -> list[tuple[str, str, int, str, dict[str, Any]]]:
    """(start, partition, seed, run folder name, settings) for the divergence sweep."""
    parts = ("iid", "dirichlet:0.1", "label-k:1") if quick else DIV_PARTITIONS
    seeds = DIV_SEEDS[:1] if quick else DIV_SEEDS
    rounds = 1 if quick else DIV_ROUNDS
    return [
        (
            start,
            p,
            seed,
            f"{task}-div-{start}-{p}-s{seed}",
            {
                **base,
                **start_settings(task, start),
                "partition": p,
                "seed": seed,
                "rounds": rounds,
                "track_divergence": True,
            },
        )
        for start in STARTS
        for p in parts
        for seed in seeds
    ]


def finished(out: Path, settings: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The history of a complete run in `out` made with `settings`, else None."""
    try:
        saved = json.loads((out / "config.json").read_text())
        history = json.loads((out / "history.json").read_text())
    except (OSError, ValueError):
        return None
    wanted = RunConfig.from_mapping({**settings, "out": str(out)}).to_dict()
    same = all(saved.get(k) == wanted[k] for k in wanted if k in settings or k == "out")
    return history if same and len(history) == wanted["rounds"] else None


class Progress:
    """Numbered progress lines with elapsed time."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.reused, self.start = total, 0, 0, time.perf_counter()

    def __call__(self, text: str) -> None:
        self.done += 1
        minutes = (time.perf_counter() - self.start) / 60
        print(f"[{time.strftime('%H:%M:%S')} {self.done}/{self.total} +{minutes:.1f} min] {text}")
        sys.stdout.flush()


def run(
    name: str, runs: Path, settings: dict[str, Any], progress: Progress, report_only: bool
) -> list[dict] | None:
    """One federated run, or its saved history when it already finished (None: not run)."""
    out = runs / name
    history = finished(out, settings)
    if history is not None or report_only:
        progress.reused += history is not None
        progress(f"{name}: {'done before, skipped' if history else 'not run'}")
        return history
    started = time.perf_counter()
    history = simulate(RunConfig.from_mapping({**settings, "out": str(out)}))
    last, seconds = history[-1], time.perf_counter() - started
    emd = last.get("emd_mean", float("nan"))
    progress(f"{name}: accuracy {last['accuracy']:.4f}, emd_mean {emd:.3f}, {seconds:.0f} s")
    return history


def reference_divergence(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Weight divergence of a finished run against the mean of SGD_REPLICAS centralized SGD
    runs from the same initial weights, per round, and SGD's own noise (cached in `out`).

    Steps are matched to what FedAvg did: each client takes ceil(n_k / B) * E steps and
    FedAvg weights its update by n_k, so SGD takes the n_k-weighted mean of the clients' steps.
    """
    cached = out / "reference_sgd.json"
    if cached.exists():
        return json.loads(cached.read_text())
    cfg = RunConfig.from_mapping({**settings, "out": str(out)})
    task = build_task(cfg.task, data_dir=cfg.data_dir, seed=cfg.seed, **cfg.task_options)
    model = task.build_model()
    fed = run_federation(task, cfg)
    if cfg.warmup_epochs:
        warm_up(task, model, cfg, fed)  # deterministic: the run started from these weights
    pooled = shadow_sgd(task, model, cfg, fed)
    sizes = [
        len(client_split(fed, k, cfg.seed, cfg.shared_per_client)[0])
        for k in range(cfg.num_clients)
    ]
    steps = fedavg_steps(sizes, cfg.batch_size, cfg.local_epochs)
    schedule = [(steps, cfg.lr * cfg.lr_decay**r) for r in range(cfg.rounds)]
    seeds = [1000 * (cfg.seed + 1) + i for i in range(SGD_REPLICAS)]
    replicas = sgd_replicas(task, model, pooled.data, pooled.train, schedule, seeds)
    rounds = []
    for r in range(cfg.rounds):
        fedavg = torch.load(out / "checkpoints" / f"round_{r + 1:03d}.pt", weights_only=True)
        states = [rep[r] for rep in replicas]
        div = weight_divergence(fedavg, mean_state(states))
        rounds.append(
            {
                "round": r + 1,
                "divergence": div["divergence"],
                "divergence_layers": div["divergence_layers"],
                "single_sgd": float(np.mean([relative_distance(fedavg, s) for s in states])),
                "sgd_noise": sgd_noise(states),
            }
        )
    result = {"steps": steps, "sizes": sizes, "rounds": rounds}
    cached.write_text(json.dumps(result, indent=1))
    return result


def divergence_runs(
    plan: list[tuple[str, str, int, str, dict[str, Any]]],
    runs: Path,
    progress: Progress,
    report_only: bool,
) -> list[dict[str, Any]]:
    """Each divergence run's EMD and divergence per round (online and against SGD's mean)."""
    rows = []
    for start, part, seed, name, settings in plan:
        history = run(name, runs, settings, progress, report_only)
        if history is None:
            continue
        ref = reference_divergence(runs / name, settings)
        rows.append(
            {
                "start": start,
                "partition": part,
                "seed": seed,
                "emd": history[-1]["emd_mean"],
                "online": [r["divergence"] for r in history],
                **{k: [r[k] for r in ref["rounds"]] for k in ("divergence", "sgd_noise")},
                "layers": ref["rounds"][0]["divergence_layers"],
            }
        )
    return rows


def pct(history: list[dict[str, Any]]) -> float:
    return 100 * history[-1]["accuracy"]


def seed_runs(accuracy: dict[str, list[dict]], key: str) -> list[list[dict]]:
    """The runs of one setting: seed 0's and those of the extra seeds (key@seedN)."""
    return [h for k, h in accuracy.items() if k == key or k.startswith(key + "@")]


def accuracy_table(task: str, accuracy: dict[str, list[dict]]) -> tuple[list[str], dict]:
    """Markdown rows for the accuracy runs and the headline numbers."""
    if "iid" not in accuracy:
        return [], {}
    iid = pct(accuracy["iid"])
    lines = [
        f"### {task}: accuracy ({len(accuracy['iid'])} rounds)",
        "",
        "| setting | EMD (mean) | accuracy (%), last round, seed 0 | mean of last 3 |"
        " change vs IID | last round, mean ± sd over seeds | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, history in accuracy.items():
        if "@" in key:
            continue
        label = LABELS.get(key, key.replace("label-k:1", "1-class"))
        emd = history[-1].get("emd_mean")
        shown = f"{emd:.2f}" if emd is not None else "n/a"
        ref = {"label-k:1": f"-{PAPER_DROP[task]}", "label-k:1+G0.05": PAPER_SHARED}.get(key, "")
        last3 = sum(100 * r["accuracy"] for r in history[-3:]) / len(history[-3:])
        runs = [pct(h) for h in seed_runs(accuracy, key)]
        spread = f"{np.mean(runs):.1f} ± {np.std(runs):.1f} ({len(runs)})" if len(runs) > 1 else ""
        lines.append(
            f"| {label} | {shown} | {pct(history):.1f} | {last3:.1f} | {pct(history) - iid:+.1f}"
            f" | {spread} | {ref} |"
        )
    summary: dict[str, Any] = {}
    if "label-k:1" in accuracy and "label-k:1+G0.05" in accuracy:
        lines.append("")
        choices = (("seed 0", lambda k: [accuracy[k]]), ("seed mean", partial(seed_runs, accuracy)))
        for name, runs_of in choices:
            iid_m, one, g5 = (
                float(np.mean([pct(h) for h in runs_of(k)]))
                for k in ("iid", "label-k:1", "label-k:1+G0.05")
            )
            drop = iid_m - one
            recovered = (g5 - one) / drop if drop > 0 else float("nan")
            summary[name] = {"drop": drop, "recovered": recovered}
            lines += [
                f"- {name}: 1-class drop {drop:.1f} points (paper: {PAPER_DROP[task]}); 5% shared"
                f" data recovers {100 * recovered:.0f}% of it (expected >= 50%; paper:"
                f" {PAPER_SHARED})."
            ]
    return lines + [""], summary


def rho(x: list[float], y: list[float]) -> float:
    return float(spearmanr(x, y).statistic) if len(x) > 2 else float("nan")


def by_partition(rows: list[dict], start: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["start"] == start:
            groups.setdefault(r["partition"], []).append(r)
    return groups


def divergence_table(task: str, rows: list[dict]) -> tuple[list[str], dict]:
    """Divergence vs EMD per start (mean +- sd over seeds), with Spearman's rho."""
    if not rows:
        return [], {}
    last = len(rows[0]["divergence"])
    seeds = len({r["seed"] for r in rows})
    lines = [
        f"### {task}: weight divergence vs EMD ({seeds} seeds, {SGD_REPLICAS} SGD replicas)",
        "",
        f"| start | partition | EMD | divergence r1 | divergence r{last} | SGD noise r1 |"
        f" SGD noise r{last} | online (1 SGD run) r1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, float] = {}
    for start in STARTS:
        groups = by_partition(rows, start)
        if not groups:
            continue
        for part, g in groups.items():

            def ms(key: str, r: int, g: list[dict] = g) -> str:
                v = np.array([x[key][r] for x in g])
                return f"{v.mean():.4f} ± {v.std():.4f}" if len(v) > 1 else f"{v.mean():.4f}"

            emd = np.mean([x["emd"] for x in g])
            lines.append(
                f"| {start} | {part} | {emd:.2f} | {ms('divergence', 0)} |"
                f" {ms('divergence', last - 1)} | {ms('sgd_noise', 0)} |"
                f" {ms('sgd_noise', last - 1)} | {ms('online', 0)} |"
            )
        mine = [r for r in rows if r["start"] == start]
        emds = [float(np.mean([x["emd"] for x in g])) for g in groups.values()]
        for key, r in (("divergence", 0), ("divergence", last - 1), ("online", 0)):
            means = [float(np.mean([x[key][r] for x in g])) for g in groups.values()]
            name = f"{start}/{'mean-of-SGD' if key == 'divergence' else 'online'}/r{r + 1}"
            summary[name] = rho(emds, means)
            summary[name + "/all-runs"] = rho([x["emd"] for x in mine], [x[key][r] for x in mine])
    lines += ["", "| Spearman rho(EMD, divergence) | over partition means | over all runs |"]
    lines += ["|---|---|---|"]
    lines += [
        f"| {k} | {v:.2f} | {summary[k + '/all-runs']:.2f} |"
        for k, v in summary.items()
        if not k.endswith("/all-runs")
    ]
    layers = rows[0]["layers"]
    if len(layers) <= 8:
        lines += [
            "",
            "Per layer, round 1, cold start (mean over seeds):",
            "",
            "| partition | " + " | ".join(layers) + " |",
            "|---|" + "---|" * len(layers),
        ]
        for part, g in by_partition(rows, "cold").items():
            cells = [f"{np.mean([x['layers'][name] for x in g]):.4f}" for name in layers]
            lines.append(f"| {part} | " + " | ".join(cells) + " |")
    return lines + [""], summary


def plots(task: str, results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    accuracy = results["accuracy"]
    if "label-k:1" in accuracy:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
        groups = [
            ("partition (FedAvg)", [k for k in ("iid", "label-k:2", "label-k:1") if k in accuracy]),
            (
                "1-class + shared G",
                ["label-k:1"] + [k for k in accuracy if "+G" in k and "@" not in k],
            ),
            (
                "1-class, strategy",
                ["label-k:1"] + [k for k in accuracy if "/" in k and "+G" not in k],
            ),
        ]
        for ax, (title, keys) in zip(axes, groups, strict=True):
            for key in keys:
                h = accuracy[key]
                label = "fedavg" if (key == "label-k:1" and "strategy" in title) else key
                rounds = [r["round"] for r in h]
                ax.plot(rounds, [100 * r["accuracy"] for r in h], marker=".", label=label)
            ax.set_title(f"{task}: {title}", fontsize=9)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0].set_ylabel("test accuracy (%)")
        fig.tight_layout()
        written.append(out / f"zhao_{task}_accuracy.png")
        fig.savefig(written[-1], dpi=80)
        plt.close(fig)

    rows = results["divergence"]
    if rows:
        starts = [s for s in STARTS if any(r["start"] == s for r in rows)]
        fig, axes = plt.subplots(1, len(starts), figsize=(5 * len(starts), 3.8), squeeze=False)
        last = len(rows[0]["divergence"])
        for ax, start in zip(axes[0], starts, strict=True):
            groups = by_partition(rows, start)
            emd = [np.mean([x["emd"] for x in g]) for g in groups.values()]
            for r, marker in ((0, "o"), (last - 1, "s")):
                d = [[x["divergence"][r] for x in g] for g in groups.values()]
                noise = [np.mean([x["sgd_noise"][r] for x in g]) for g in groups.values()]
                line = ax.errorbar(
                    emd,
                    [np.mean(v) for v in d],
                    yerr=[np.std(v) for v in d],
                    fmt=marker,
                    capsize=2,
                    label=f"divergence, round {r + 1}",
                )
                order = np.argsort(emd)
                ax.plot(
                    np.array(emd)[order],
                    np.array(noise)[order],
                    "--",
                    color=line[0].get_color(),
                    alpha=0.6,
                    label=f"SGD noise floor, round {r + 1}",
                )
                if r == 0:
                    for x, y, p in zip(emd, [np.mean(v) for v in d], groups, strict=True):
                        ax.annotate(p, (x, y), fontsize=6)
            ax.set_xlabel("EMD (n_k-weighted mean)")
            ax.set_ylabel("||w_FedAvg - w_SGD|| / ||w_SGD||")
            ax.set_title(f"{task}: divergence vs EMD, {start} start", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        fig.tight_layout()
        written.append(out / f"zhao_{task}_divergence.png")
        fig.savefig(written[-1], dpi=80)
        plt.close(fig)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,kws", help="comma-separated: digits, kws")
    parser.add_argument("--quick", action="store_true", help="a few short runs (a smoke test)")
    parser.add_argument(
        "--out", default="docs/results", help="folder for zhao_tables.md and the plots"
    )
    parser.add_argument(
        "--runs", default="runs/zhao", help="folder for the runs (finished ones are skipped)"
    )
    parser.add_argument(
        "--only",
        choices=("all", "accuracy", "divergence"),
        default="all",
        help="run and report only one part",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="start no run: tables and plots from the finished runs in --runs",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tasks = args.tasks.split(",")
    bases = {task: base_settings(task, args.quick) for task in tasks}
    div_plans = {
        t: divergence_plan(t, bases[t], args.quick) if args.only != "accuracy" else []
        for t in tasks
    }
    acc_plans = {t: accuracy_plan(t, bases[t]) if args.only != "divergence" else {} for t in tasks}
    total = sum(len(div_plans[t]) + len(acc_plans[t]) for t in tasks)
    print(f"{total} runs: the divergence sweeps of {', '.join(tasks)} first, then accuracy")
    progress = Progress(total)
    rows = {t: divergence_runs(div_plans[t], runs, progress, args.report_only) for t in tasks}
    sections, summary = [], {}
    for task in tasks:
        accuracy = {}
        for key, (name, settings) in acc_plans[task].items():
            history = run(name, runs, settings, progress, args.report_only)
            if history is not None:
                accuracy[key] = history
        results = {"accuracy": accuracy, "divergence": rows[task]}
        acc_lines, acc_summary = accuracy_table(task, accuracy)
        div_lines, div_summary = divergence_table(task, rows[task])
        summary[task] = {**acc_summary, "spearman": div_summary}
        pngs = plots(task, results, out)
        text = "\n".join(div_lines + acc_lines)
        sections.append(text + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n")
        print(text, flush=True)
    (runs / "summary.json").write_text(json.dumps(summary, indent=2))
    command = "nice -n 10 .venv/bin/python simulations/zhao_noniid.py " + " ".join(sys.argv[1:])
    minutes = (time.perf_counter() - started) / 60
    header = (
        f"Command (2-core CPU sandbox, shared with other jobs): `{command.strip()}`"
        f" ({minutes:.0f} min for this invocation, which reused {progress.reused} of"
        f" {progress.total} runs finished in {runs})\n\n"
    )
    (out / "zhao_tables.md").write_text(header + "\n".join(sections))


if __name__ == "__main__":
    main()
