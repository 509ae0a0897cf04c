"""HRViT against a plain ViT and a small CNN at the same parameter budget, then federated.

Part 1 trains the tiny HRViT, a single-scale ViT and a U-Net (each ~170k parameters) on the
same procedural scenes with the same SGD loop a fedge client runs, and reports test mIoU,
pixel accuracy, parameters, forward FLOPs per image (torch's FlopCounterMode) and the
wall time of one training step. Part 2 runs federated training of the tiny HRViT with
`fedge.server.app.simulate`, one style per client (feature-skew non-IID).

    .venv/bin/python simulations/hrvit_segmentation.py --out runs/hrvit_segmentation

Writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import copy
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

# The three contenders, sized to about the same number of parameters (~170k).
CONTENDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "HRViT-tiny": lambda classes, size: build_model("tiny", num_classes=classes),
    "plain ViT (patch 4, dim 64, depth 3)": lambda classes, size: PlainViT(classes, size),
    "U-Net (width 19)": lambda classes, size: SmallUNet(classes, width=19),
}


def forward_flops(model: nn.Module, image_size: int) -> int:
    """FLOPs of one forward pass on one image. Gradients stay on: under no_grad, torch's
    TransformerEncoderLayer takes a fused fast path that FlopCounterMode does not see."""
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops()


def step_seconds(task: HRViTTask, model: nn.Module, batch_size: int, repeats: int = 6) -> float:
    """Median wall time of one SGD step (forward, backward, update) on a batch."""
    model.train()
    batch = next(iter(task.loader(task.train_dataset(), batch_size, shuffle=False)))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        opt.zero_grad()
        task.loss(model, batch).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])  # the first steps pay for allocation


def centralized(task: HRViTTask, args: argparse.Namespace) -> list[dict]:
    rows = []
    for lr in args.lrs:
        for name, make in CONTENDERS.items():
            torch.manual_seed(args.seed)
            model = make(task.num_classes, args.image_size)
            row = {
                "model": name,
                "lr": lr,
                "params": sum(p.numel() for p in model.parameters()),
                "mflops": forward_flops(copy.deepcopy(model), args.image_size) / 1e6,
                "step_ms": 1000 * step_seconds(task, copy.deepcopy(model), args.batch_size),
            }
            cfg = TrainConfig(
                epochs=args.epochs, batch_size=args.batch_size, lr=lr, momentum=0.9,
                seed=args.seed,
            )  # fmt: skip
            report = task.train(model, task.train_dataset(), cfg)
            metrics = task.evaluate(model, task.test_dataset())
            row.update(
                train_seconds=report.seconds,
                train_loss=report.loss,
                miou=metrics["miou"],
                pixel_accuracy=metrics["pixel_accuracy"],
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def federated(args: argparse.Namespace) -> list[dict]:
    from fedge.config import RunConfig
    from fedge.server.app import simulate

    cfg = RunConfig(
        task="hrvit",
        task_options={
            "image_size": args.image_size,
            "num_images": args.num_images,
            "num_test_images": args.num_test_images,
            "num_styles": args.clients,
        },
        num_clients=args.clients,
        rounds=args.rounds,
        partition="natural",
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=args.fed_lr,
        momentum=0.9,
        eval_fraction=0.0,
        seed=args.seed,
        out=str(Path(args.out) / "federated"),
    )
    cfg.validate()
    return simulate(cfg)


def markdown(central: list[dict], fed: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Procedural scenes, {args.image_size}x{args.image_size} px, {args.num_images} train / "
        f"{args.num_test_images} test images, 8 classes; SGD momentum 0.9, batch "
        f"{args.batch_size}, {args.epochs} epochs; one torch thread.",
        "",
        "| model | lr | params | MFLOPs / image | train step (ms, batch "
        f"{args.batch_size}) | train s | test mIoU | pixel acc. |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in central:
        lines.append(
            f"| {r['model']} | {r['lr']} | {r['params']:,} | {r['mflops']:.1f} | "
            f"{r['step_ms']:.0f} | {r['train_seconds']:.0f} | {r['miou']:.3f} | "
            f"{r['pixel_accuracy']:.3f} |"
        )
    if fed:
        lines += [
            "",
            f"Federated HRViT-tiny: {args.clients} clients, one style each (partition natural), "
            f"FedAvg, {args.local_epochs} local epoch(s), lr {args.fed_lr}.",
            "",
            "| round | test mIoU | pixel acc. | seconds |",
            "|---:|---:|---:|---:|",
        ]
        for r in fed:
            lines.append(
                f"| {r['round']} | {r['miou']:.3f} | {r['pixel_accuracy']:.3f} | "
                f"{r['seconds']:.1f} |"
            )
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
    central = [] if args.skip_central else centralized(task, args)
    fed = [] if args.skip_federated else federated(args)
    (out / "results.json").write_text(json.dumps({"centralized": central, "federated": fed}))
    (out / "results.md").write_text(markdown(central, fed, args))
    print(markdown(central, fed, args))


if __name__ == "__main__":
    main()
