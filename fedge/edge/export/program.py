"""What is exported: a run's global model, its inputs as the test set shapes them, and the
torch.export program both device formats start from.

A device runtime plans memory for fixed or bounded shapes, so the batch dimension, and any
other dimension that varies over the test set (an utterance's frames), is exported as a
bounded dynamic dimension; the rest is fixed at the size the task's data has.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind, TensorArgument
from torch.utils.data import Dataset, Subset

from fedge.config import RunConfig, saved_config
from fedge.errors import ConfigError
from fedge.server.checkpoint import load_model, model_path
from fedge.tasks.base import Task
from fedge.tasks.registry import build_task

Inputs = tuple[torch.Tensor, ...]


class ExportError(ConfigError):
    """A model that a format or runtime cannot take; the message names the operator."""


@dataclass
class LoadedRun:
    """A run folder's task, its global model (eval mode) and where the weights came from."""

    cfg: RunConfig
    task: Task
    model: nn.Module
    weights: Path


def load_run(run_dir: str | Path, server_round: int | None = None) -> LoadedRun:
    """The task and global model of a fedge run: `final_model.pt`, or the checkpoint of
    `server_round`. ConfigError names the missing or damaged file."""
    run = Path(run_dir)
    cfg = RunConfig.from_mapping({**saved_config(run), "out": str(run), "resume": False})
    weights = run / "final_model.pt" if server_round is None else model_path(run, server_round)
    if not weights.exists():
        hint = "it has not finished; pass --round N" if server_round is None else "see checkpoints/"
        raise ConfigError(f"{weights} does not exist ({hint})")
    task = build_task(cfg.task, data_dir=cfg.data_dir, seed=cfg.seed, **cfg.task_options)
    model = task.build_model()
    load_model(weights, model)
    return LoadedRun(cfg, task, model.eval(), weights)


def batches(task: Task, data: Dataset, batch_size: int) -> Iterator[Inputs]:
    """The model inputs of each batch of `data`, in order."""
    for batch in task.loader(data, batch_size, shuffle=False):
        yield task.model_inputs(batch)


def calibration_set(task: Task, size: int, seed: int) -> Dataset:
    """`size` random samples of the server's training pool (never the test set it reports
    on), which int8 quantization observes to pick its ranges."""
    pool = task.train_dataset()
    count = len(pool)  # type: ignore[arg-type]
    pick = np.random.default_rng(seed).choice(count, size=min(size, count), replace=False)
    return Subset(pool, sorted(pick.tolist()))


def dynamic_shapes(shapes: list[list[tuple[int, ...]]]) -> tuple[dict[int, Any], ...]:
    """Bounded dynamic dimensions from the input shapes of every batch: dimension 0 (one
    batch dimension shared by all inputs) and any other that varies between batches, whose
    lower bound torch.export raises to what the model needs (a length the subsampling
    leaves at least one frame of)."""
    batch = Dim("batch", min=1, max=max(s[0][0] for s in shapes))
    out: list[dict[int, Any]] = []
    for i, first in enumerate(shapes[0]):
        dims: dict[int, Any] = {0: batch} if first else {}
        for d in range(1, len(first)):
            sizes = {s[i][d] for s in shapes}
            if len(sizes) > 1:
                dims[d] = Dim.AUTO(min=2, max=max(sizes))
        out.append(dims)
    return tuple(out)


def bounds(program: ExportedProgram) -> dict[str, tuple[int, int]]:
    """Each dynamic input dimension, as `input[dim]`, and the sizes the artifact takes."""
    users = {
        spec.arg.name
        for spec in program.graph_signature.input_specs
        if spec.kind == InputKind.USER_INPUT and isinstance(spec.arg, TensorArgument)
    }
    out = {}
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in users:
            continue
        for d, size in enumerate(node.meta["val"].shape):
            if isinstance(size, torch.SymInt):
                limits = program.range_constraints[size.node.expr]
                out[f"{node.name}[{d}]"] = (int(limits.lower), int(limits.upper))
    return out


def widest(task: Task, data: Dataset, batch_size: int) -> tuple[Inputs, list[list[tuple]]]:
    """The inputs of the test batch with the most elements (a trace example that exercises
    every dynamic dimension above its minimum) and the shapes of all batches."""
    shapes, best, size = [], None, -1
    for inputs in batches(task, data, batch_size):
        shapes.append([tuple(t.shape) for t in inputs])
        n = sum(t.numel() for t in inputs)
        if n > size:
            best, size = inputs, n
    if best is None:
        raise ConfigError("the task's test set is empty: nothing to export or check against")
    return best, shapes


def export_program(model: nn.Module, example: Inputs, shapes: list[list[tuple]]) -> ExportedProgram:
    """torch.export of `model` with bounded dynamic dimensions; an ExportError names the
    operator or the Python construct that cannot be captured."""
    try:
        return torch.export.export(model, example, dynamic_shapes=dynamic_shapes(shapes))
    except Exception as exc:  # torch raises many types; each message says what failed
        raise ExportError(f"torch.export failed{operator_in(exc)}: {first_line(exc)}") from exc


def operator_in(exc: BaseException) -> str:
    """` at operator X` when an exporter's message names an ATen operator, else ``."""
    found = re.search(r"aten[:._]+([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)", str(exc))
    return f" at operator aten::{found.group(1)}" if found else ""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
