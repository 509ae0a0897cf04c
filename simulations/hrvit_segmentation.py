"""HRViT against a plain ViT and a small CNN at the same parameter budget, then federated.

Part 1 trains the tiny HRViT, a single-scale ViT and a U-Net (each ~208k parameters) on the
same procedural scenes with the same SGD loop a fedge client runs, and reports test mIoU,
pixel accuracy, parameters, forward FLOPs per image (torch's FlopCounterMode) and the
wall time of one training step. Part 2 runs federated training of the tiny HRViT with
`fedge.server.app.simulate`, one style per client (feature-skew non-IID).

    .venv/bin/python simulations/hrvit_segmentation.py --out runs/hrvit_segmentation

Writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedge.tasks.base import TrainConfig
from fedge.tasks.hrvit.baselines import PlainViT, SmallUNet
from fedge.tasks.hrvit.model import build_model
from fedge.tasks.hrvit.task import HRViTTask

# The three contenders, sized to about the same number of parameters (~208k).
CONTENDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "HRViT-tiny": lambda classes, size: build_model("tiny", num_classes=classes),
    "plain ViT (patch 4, dim 72, depth 3)": lambda classes, size: PlainViT(classes, size, dim=72),
    "U-Net (width 21)": lambda classes, size: SmallUNet(classes, width=21),
}


def forward_flops(model: nn.Module, image_size: int) -> int:
    """FLOPs of one forward pass on one image. Gradients stay on: under no_grad, torch's
    TransformerEncoderLayer takes a fused fast path that FlopCounterMode does not see."""
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    return counter.get_total_flops()


# The paper's ADE20K table (SegFormer head, 512x512 crops): parameters (M) and GFLOPs.
PAPER = {"b1": (8.2, 14.6), "b2": (20.8, 28.0), "b3": (28.7, 67.9)}


def paper_scale() -> list[dict]:
    """b1/b2/b3 with 150 classes at 512x512, counted on the meta device (no memory, no
    compute): parameters and multiply-accumulates, next to the paper's table."""
    rows = []
    for name, (params_m, gflops) in PAPER.items():
        with torch.device("meta"):
            model = build_model(name, num_classes=150)
            macs = forward_flops(model, 512) / 2
        params = sum(p.numel() for p in model.parameters())
        rows.append(
            {
                "model": name,
                "params_m": params / 1e6,
                "gmacs": macs / 1e9,
                "paper_params_m": params_m,
                "paper_gflops": gflops,
            }
        )
    return rows


def step_times(task: HRViTTask, models: dict[str, nn.Module], batch_size: int) -> dict:
    """Median wall time of one SGD step (forward, backward, update) per model. The models
    take turns step by step, so load from other processes on a shared machine hits all alike."""
    batch = next(iter(task.loader(task.train_dataset(), batch_size, shuffle=False)))
    opts = {name: torch.optim.SGD(m.parameters(), lr=0.0) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(12):
        for name, model in models.items():
            model.train()
            start = time.perf_counter()
            opts[name].zero_grad()
            task.loss(model, batch).backward()
            opts[name].step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[2:]) for name, t in times.items()}  # 2 warm-up steps


def costs(task: HRViTTask, args: argparse.Namespace) -> list[dict]:
    """Parameters, forward FLOPs per image and training step time of each contender."""
    models = {name: make(task.num_classes, args.image_size) for name, make in CONTENDERS.items()}
    steps = step_times(task, models, args.batch_size)
    return [
        {
            "model": name,
            "params": sum(p.numel() for p in model.parameters()),
            "mflops": forward_flops(model, args.image_size) / 1e6,
            "step_ms": 1000 * steps[name],
        }
        for name, model in models.items()
    ]


def centralized(task: HRViTTask, args: argparse.Namespace) -> list[dict]:
    """Train every contender from the same seed at every learning rate; test mIoU."""
    rows = []
    for lr in args.lrs:
        for name, make in CONTENDERS.items():
            torch.manual_seed(args.seed)
            model = make(task.num_classes, args.image_size)
            cfg = TrainConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=lr,
                momentum=0.9,
                seed=args.seed,
            )
            report = task.train(model, task.train_dataset(), cfg)
            metrics = task.evaluate(model, task.test_dataset())
            row = {
                "model": name,
                "lr": lr,
                "train_seconds": report.seconds,
                "train_loss": report.loss,
                "miou": metrics["miou"],
                "pixel_accuracy": metrics["pixel_accuracy"],
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def federated(args: argparse.Namespace) -> dict[str, list[dict]]:
    """FedAvg on the tiny HRViT under each partition scheme; history per scheme."""
    from fedge.config import RunConfig
    from fedge.simulation import simulate

    histories = {}
    for scheme in args.partitions:
        cfg = RunConfig(
            task="hrvit",
            task_options={
                "image_size": args.image_size,
                "num_images": args.num_images,
                "num_test_images": args.num_test_images,
                "num_styles": args.clients,  # so that "natural" gives one style per client
            },
            num_clients=args.clients,
            rounds=args.rounds,
            partition=scheme,
            local_epochs=args.local_epochs,
            batch_size=args.batch_size,
            lr=args.fed_lr,
            momentum=0.9,
            eval_fraction=0.0,
            backend=args.backend,
            seed=args.seed,
            out=str(Path(args.out) / f"federated-{scheme.replace(':', '')}"),
        )
        cfg.validate()
        histories[scheme] = simulate(cfg)
    return histories


def markdown(paper: list[dict], cost: list[dict], central: list[dict], fed: dict, args) -> str:
    lines = [
        "| config | params (M) | paper params (M) | GMACs at 512x512 | paper GFLOPs |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r['model']} | {r['params_m']:.2f} | {r['paper_params_m']} | "
            f"{r['gmacs']:.1f} | {r['paper_gflops']} |"
            for r in paper
        ),
        "",
        f"Procedural scenes, {args.image_size}x{args.image_size} px, {args.num_images} train / "
        f"{args.num_test_images} test images, 8 classes; SGD momentum 0.9, batch "
        f"{args.batch_size}, {args.epochs} epochs; {args.threads} torch thread(s).",
        "",
        f"| model | params | MFLOPs / image | train step (ms, batch {args.batch_size}) |",
        "|---|---:|---:|---:|",
    ]
    for r in cost:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['mflops']:.1f} | {r['step_ms']:.0f} |")
    if central:
        lines += [
            "",
            "| model | lr | train s | mean train loss | test mIoU | pixel acc. |",
            "|---|---:|---:|---:|---:|---:|",
        ]
    for r in central:
        lines.append(
            f"| {r['model']} | {r['lr']} | {r['train_seconds']:.0f} | {r['train_loss']:.3f} | "
            f"{r['miou']:.3f} | {r['pixel_accuracy']:.3f} |"
        )
    if fed:
        schemes = list(fed)
        lines += [
            "",
            f"Federated HRViT-tiny, FedAvg: {args.clients} clients, all every round, "
            f"{args.local_epochs} local epoch(s), lr {args.fed_lr}; test mIoU after each round. "
            "natural = one style per client; label-k:K = K dominant classes per client.",
            "",
            "| round | " + " | ".join(schemes) + " |",
            "|---:|" + "---:|" * len(schemes),
        ]
        for i in range(len(fed[schemes[0]])):
            cells = [f"{fed[s][i]['miou']:.3f}" for s in schemes]
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
        seconds = [f"{sum(r['seconds'] for r in fed[s]):.0f}" for s in schemes]
        lines.append("| wall s | " + " | ".join(seconds) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/hrvit_segmentation")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--num-test-images", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")], default=[0.1])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--fed-lr", type=float, default=0.1)
    parser.add_argument("--backend", default="local", help="simulate's engine [local]")
    parser.add_argument("--partitions", type=lambda s: s.split(","), default=["natural", "iid"])
    parser.add_argument("--skip-central", action="store_true")
    parser.add_argument("--skip-federated", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = HRViTTask(
        seed=args.seed,
        image_size=args.image_size,
        num_images=args.num_images,
        num_test_images=args.num_test_images,
    )
    paper = paper_scale()
    cost = costs(task, args)
    print(json.dumps(paper), json.dumps(cost), flush=True)
    central = [] if args.skip_central else centralized(task, args)
    fed = {} if args.skip_federated else federated(args)
    results = {"paper_scale": paper, "costs": cost, "centralized": central, "federated": fed}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(paper, cost, central, fed, args)
    (out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
