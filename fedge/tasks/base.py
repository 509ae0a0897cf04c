"""The Task interface: what a client learns, with no knowledge of Flower.

A Task owns a model family, a training pool (whose per-sample labels drive partitioning),
a held-out test set, a per-batch loss and per-batch evaluation sums. The training loop
lives here once, so every task gets the same round budget, proximal term and
control-variate hooks for free.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

Batch = Any
# A hook called after loss.backward() and before optimizer.step(): it may edit .grad in place.
GradHook = Callable[[nn.Module], None]


@dataclass
class TrainConfig:
    """How one client trains in one round.

    epochs: passes over the local data. batch_size: examples per step. lr: SGD learning
    rate. max_seconds: the round's wall-clock budget; training stops early past it (0: none).
    max_steps: stop after this many steps (0: none). proximal_mu: FedProx's mu; the term
    mu/2 ||w - w_global||^2 is added to the loss. grad_hooks: extra gradient edits
    (SCAFFOLD's control variates), applied in order.
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    max_seconds: float = 0.0
    max_steps: int = 0
    proximal_mu: float = 0.0
    grad_hooks: list[GradHook] = field(default_factory=list)
    seed: int = 0


@dataclass
class TrainReport:
    """What local training did: examples seen, optimizer steps, mean loss, wall seconds,
    whether the round budget cut it short, and the example-weighted mean of the squared
    batch losses (Oort's statistical utility)."""

    num_examples: int
    steps: int
    loss: float
    seconds: float
    stopped_early: bool
    loss_squared: float = 0.0


class OwnData(NamedTuple):
    """A client's own data, made by a task for that client: train and evaluation splits and
    the training split's examples per label over all the task's labels (the client reports
    these counts, never samples)."""

    train: Dataset
    eval: Dataset
    label_counts: list[int]


class Task(ABC):
    """A learning problem a fedge client can train and evaluate.

    Subclasses set `name`, build the model, expose the training pool's labels (used by
    `fedge.data.partition`), return datasets, and define `loss` and `eval_sums`.
    `metric` names the headline metric and `higher_is_better` its direction.
    """

    name: ClassVar[str]
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, data_dir: str | None = None, seed: int = 0, **options: Any) -> None:
        self.data_dir = data_dir
        self.seed = seed
        if options:
            raise ValueError(
                f"task {self.name!r} got unknown options {sorted(options)}; "
                "remove them from [task_options]"
            )

    # --- model and data -------------------------------------------------------------
    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (deterministic under `self.seed`)."""

    @abstractmethod
    def train_labels(self) -> np.ndarray:
        """One integer label per sample of the training pool, for partitioning."""

    def train_groups(self) -> np.ndarray | None:
        """A natural group per training sample (speaker, topic), or None if the task has none."""
        return None

    def client_data(self, partition_id: int) -> OwnData | None:
        """Client `partition_id`'s own data, for a task that makes each client's data itself
        (any population: nothing is cut from a pool, and client k's data depends only on the
        seed and k); None (the default): clients cut `train_dataset()` by the run's scheme."""
        return None

    @abstractmethod
    def train_dataset(self, indices: np.ndarray | None = None) -> Dataset:
        """The training pool, or the subset at `indices` (a client's partition)."""

    @abstractmethod
    def test_dataset(self) -> Dataset:
        """The held-out test set used for centralized evaluation."""

    def collate(self, items: list[Any]) -> Batch:
        """Stack dataset items into a batch (override for variable-length data)."""
        return torch.utils.data.default_collate(items)

    def model_inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """The model's positional inputs in a batch, what an exported model takes: by default
        the batch's first field; a task whose model takes more overrides this."""
        return (batch[0],)

    # --- learning -------------------------------------------------------------------
    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean training loss of a batch (a scalar that backward() is called on)."""

    @abstractmethod
    def eval_sums(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """Sums over a batch: must include `loss` (summed) and `num_examples`."""

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Turn accumulated sums into metrics; the default gives mean loss and accuracy."""
        n = max(sums.get("num_examples", 0.0), 1.0)
        out = {"loss": sums.get("loss", 0.0) / n, "num_examples": sums.get("num_examples", 0.0)}
        if "correct" in sums:
            out["accuracy"] = sums["correct"] / n
        return out

    def loader(self, data: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            data,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.collate,
            generator=generator,
            drop_last=False,
        )

    def train(self, model: nn.Module, data: Dataset, cfg: TrainConfig) -> TrainReport:
        """Local SGD under the round budget; see `train_loop`."""
        return train_loop(self, model, data, cfg)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Dataset, batch_size: int = 256) -> dict[str, float]:
        model.eval()
        sums: dict[str, float] = {}
        for batch in self.loader(data, batch_size, shuffle=False):
            for k, v in self.eval_sums(model, batch).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return self.finalize(sums)


def classification_sums(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Eval sums of a classifier: summed cross-entropy, correct predictions, examples."""
    return {
        "loss": F.cross_entropy(logits, labels, reduction="sum").item(),
        "correct": (logits.argmax(-1) == labels).sum().item(),
        "num_examples": len(labels),
    }


def num_samples(data: Dataset) -> int:
    """The number of samples of a Task's dataset (every dataset a Task returns has a length)."""
    if not isinstance(data, Sized):
        raise TypeError(f"{type(data).__name__} has no length; a Task's datasets must have one")
    return len(data)


def exchanged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What clients and server exchange: the state_dict without frozen parameters.

    Frozen parameters (a LoRA model's base weights) are rebuilt identically from the task
    on both sides, so a device ships only what it trained.
    """
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def load_exchanged(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an exchanged state; a mismatch says which keys and what to check."""
    expected, got = set(exchanged_state(model)), set(state)
    if got != expected:
        raise ValueError(
            f"weights do not fit the model: missing {sorted(expected - got)[:4]}, "
            f"unexpected {sorted(got - expected)[:4]}; client and server must run the same "
            "task with the same options"
        )
    model.load_state_dict(state, strict=False)


def _batches(task: Task, data: Dataset, cfg: TrainConfig) -> Iterator[Batch]:
    for epoch in range(cfg.epochs):
        yield from task.loader(data, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch)


def batch_size_of(batch: Batch) -> int:
    """Examples in a batch: the leading dimension of its first tensor."""
    first = batch[0] if isinstance(batch, list | tuple) else batch
    if isinstance(first, dict):
        first = next(iter(first.values()))
    return int(first.shape[0])


def proximal_term(model: nn.Module, anchor: Iterable[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx: mu/2 * ||w - w_global||^2 over trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    squares = (((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
    return 0.5 * mu * sum(squares, torch.zeros(()))


def train_loop(task: Task, model: nn.Module, data: Dataset, cfg: TrainConfig) -> TrainReport:
    """Plain SGD over `cfg.epochs` passes, stopping when the time or step budget runs out."""
    torch.manual_seed(cfg.seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    anchor = [p.detach().clone() for p in params] if cfg.proximal_mu > 0 else None
    start = time.perf_counter()
    steps, seen, loss_sum, square_sum, stopped = 0, 0, 0.0, 0.0, False
    for batch in _batches(task, data, cfg):
        budget_gone = cfg.max_seconds > 0 and time.perf_counter() - start >= cfg.max_seconds
        if budget_gone or (cfg.max_steps and steps >= cfg.max_steps):
            stopped = True
            break
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        if anchor is not None:
            loss = loss + proximal_term(model, anchor, cfg.proximal_mu)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"training loss became {loss.item()} at step {steps}; lower --lr"
            )
        loss.backward()
        for hook in cfg.grad_hooks:
            hook(model)
        opt.step()
        n = batch_size_of(batch)
        steps += 1
        seen += n
        loss_sum += loss.item() * n
        square_sum += loss.item() ** 2 * n
    return TrainReport(
        num_examples=seen,
        steps=steps,
        loss=loss_sum / max(seen, 1),
        seconds=time.perf_counter() - start,
        stopped_early=stopped,
        loss_squared=square_sum / max(seen, 1),
    )
