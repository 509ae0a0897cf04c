"""The fedge ServerApp: a strategy and a Task, run on any Grid.

`run_server(grid, cfg)` is the whole server side: wait for the clients, run the strategy's
rounds (Flower's own loop, untouched), evaluate the global model centrally after every
round, and write `history.json`, a checkpoint per round and `history.png` into `cfg.out`.
The same function runs under a real SuperLink (`fedge server`), under Flower's simulation
and on fedge's in-process grid (`simulate`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedge.config import RunConfig
from fedge.data.shared import Federation, client_split, federation
from fedge.server.divergence import ShadowSGD, client_drift, label_skew, weight_divergence
from fedge.server.history import History, atomic_write_bytes, summarize_evaluate, summarize_train
from fedge.strategies import build_strategy
from fedge.tasks import Task, TrainConfig, build_task
from fedge.tasks.base import exchanged_state, load_exchanged

CONFIG_KEY = "fedge-config"  # run_config key holding the path of the run's config JSON
console = Console(highlight=False, soft_wrap=True)


class RoundObserver(Grid):
    """Passes everything through to `grid`, keeping the last replies of each message type.

    The strategy never knows it is there; the server reads device metrics and failures
    from what it saw.
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.last: dict[str, tuple[list[Message], int]] = {}  # kind -> (replies, unanswered)

    def set_run(self, run_id: int) -> None:
        self.grid.set_run(run_id)

    @property
    def run(self) -> Any:  # type: ignore[override]
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if messages:
            kind = messages[0].metadata.message_type
            self.last[kind] = (replies, len(messages) - len(replies))
        return replies

    def take(self, kind: str) -> tuple[list[Message], int]:
        """The last round's replies of `kind`, and how many nodes never answered."""
        return self.last.pop(kind, ([], 0))


def wait_for_nodes(grid: Grid, expected: int, timeout: float, poll: float = 0.5) -> int:
    """Block until `expected` nodes are connected; Flower would otherwise sample too early."""
    deadline = time.monotonic() + timeout
    last_seen = -1
    while True:
        seen = len(list(grid.get_node_ids()))
        if seen >= expected:
            return seen
        if seen != last_seen:
            console.print(f"waiting for clients: {seen}/{expected} connected")
            last_seen = seen
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {seen} of {expected} clients connected after {timeout:.0f} s; "
                "start more clients or lower --min-clients/--num-clients"
            )
        time.sleep(poll)


def sampling(cfg: RunConfig) -> dict[str, Any]:
    """Strategy sampling arguments that give exactly `sampled_per_round` clients a round."""
    k, n = cfg.sampled_per_round, cfg.num_clients
    n_eval = math.ceil(cfg.eval_fraction * k)
    return {
        "fraction_train": k / n,
        "min_train_nodes": k,
        "fraction_evaluate": n_eval / n if n_eval else 0.0,
        "min_evaluate_nodes": n_eval,
        "min_available_nodes": n,
    }


def client_config(cfg: RunConfig) -> ConfigRecord:
    """The run spec every instruction carries to the clients."""
    return ConfigRecord(
        {
            "task": cfg.task,
            "task-options": json.dumps(cfg.task_options, sort_keys=True),
            "data-dir": cfg.data_dir or "",
            "partition": cfg.partition,
            "seed": cfg.seed,
            "shared-fraction": cfg.shared_fraction,
            "shared-per-client": cfg.shared_per_client,
            "local-epochs": cfg.local_epochs,
            "batch-size": cfg.batch_size,
            "lr": cfg.lr,
            "lr-decay": cfg.lr_decay,
            "momentum": cfg.momentum,
            "max-train-seconds": cfg.max_train_seconds,
            "device": cfg.device,
        }
    )


def server_federation(task: Task, cfg: RunConfig) -> Federation:
    """The clients' partitions and G, by the same function the clients call."""
    return federation(
        task.train_labels(),
        cfg.num_clients,
        cfg.partition,
        cfg.seed,
        task.train_groups(),
        cfg.shared_fraction,
    )


def local_sgd(cfg: RunConfig, epochs: int) -> TrainConfig:
    """The clients' optimizer settings, for server-side training (warm-up, shadow SGD)."""
    return TrainConfig(
        epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum, seed=cfg.seed
    )


def warm_up(task: Task, model: torch.nn.Module, cfg: RunConfig, fed: Federation) -> None:
    """Zhao et al.'s warm-up: train the initial global model on the shared subset G."""
    report = task.train(model, task.train_dataset(fed.shared), local_sgd(cfg, cfg.warmup_epochs))
    console.print(
        f"warm-up on G: {len(fed.shared)} samples, {cfg.warmup_epochs} epochs, "
        f"loss {report.loss:.4f}"
    )


def shadow_sgd(task: Task, model: torch.nn.Module, cfg: RunConfig, fed: Federation) -> ShadowSGD:
    """Centralized SGD on every client's training data pooled (for weight divergence)."""
    pooled = [
        client_split(fed, pid, cfg.seed, cfg.shared_per_client)[0] for pid in range(cfg.num_clients)
    ]
    data = task.train_dataset(np.concatenate(pooled))
    return ShadowSGD(task, model, data, local_sgd(cfg, cfg.local_epochs))


def save_checkpoint(out: Path, server_round: int, model: torch.nn.Module) -> Path:
    """The whole global model after a round (frozen weights included), written atomically."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    path = out / "checkpoints" / f"round_{server_round:03d}.pt"
    atomic_write_bytes(path, buf.getvalue())
    return path


def progress_line(record: dict[str, Any], rounds: int, metric: str) -> str:
    value = record.get(metric)
    shown = f"{value:.4f}" if isinstance(value, float) else "n/a"
    loss = record.get("loss")
    return (
        f"round {record['round']}/{rounds}  {metric} {shown}  "
        f"loss {loss:.4f}  clients {record.get('num_clients', 0)}"
        f" ({record.get('failures', 0)} failed)  {record['seconds']:.1f} s"
    )


def run_server(grid: Grid, cfg: RunConfig, task: Task | None = None) -> list[dict[str, Any]]:
    """Run all rounds on `grid` and return the history (also written to `cfg.out`)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    task = task or build_task(cfg.task, data_dir=cfg.data_dir, seed=cfg.seed, **cfg.task_options)
    model = task.build_model()
    test_data = task.test_dataset()
    fed = server_federation(task, cfg) if cfg.warmup_epochs or cfg.track_divergence else None
    if cfg.warmup_epochs:
        warm_up(task, model, cfg, fed)
    shadow = shadow_sgd(task, model, cfg, fed) if cfg.track_divergence else None
    strategy = build_strategy(cfg.strategy, cfg.strategy_options, sampling(cfg), lr=cfg.lr)
    history = History(out, metric=task.metric)
    observer = RoundObserver(grid)
    wait_for_nodes(grid, cfg.num_clients, timeout=cfg.round_timeout)
    console.print(
        f"fedge: task {cfg.task}, strategy {type(strategy).__name__}, "
        f"{cfg.sampled_per_round}/{cfg.num_clients} clients a round, {cfg.rounds} rounds -> {out}"
    )
    clock = {"t": time.perf_counter()}
    sent: dict[str, ArrayRecord] = {}  # the global model the clients trained from this round

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Centralized evaluation, and the end-of-round bookkeeping Flower calls us for."""
        load_exchanged(model, arrays.to_torch_state_dict())
        metrics = task.evaluate(model, test_data)
        metrics.pop("num_examples", None)
        if server_round == 0:
            console.print(f"initial model: {task.metric} {metrics.get(task.metric, math.nan):.4f}")
            clock["t"] = time.perf_counter()
            sent["arrays"] = arrays
            return MetricRecord(metrics)
        replies, unanswered = observer.take(MessageType.TRAIN)
        train = summarize_train(replies)
        train["failures"] += unanswered  # a node that never answered failed too
        record = {"round": server_round, **metrics, **train, **label_skew(replies)}
        record.update(client_drift(replies, sent["arrays"]))
        if shadow is not None:
            steps = [int(m.content["metrics"]["steps"]) for m in replies if not m.has_error()]
            steps = round(sum(steps) / max(len(steps), 1))  # Zhao: T local steps <-> T SGD steps
            lr = cfg.lr * cfg.lr_decay ** (server_round - 1)
            record.update(weight_divergence(arrays, shadow.step(server_round, steps, lr)))
        sent["arrays"] = arrays
        record.update(summarize_evaluate(observer.take(MessageType.EVALUATE)[0]))
        record["seconds"] = time.perf_counter() - clock["t"]
        save_checkpoint(out, server_round, model)
        history.append(record)
        console.print(progress_line(record, cfg.rounds, task.metric))
        clock["t"] = time.perf_counter()
        return MetricRecord(metrics)

    spec = client_config(cfg)
    result = strategy.start(
        grid=observer,
        initial_arrays=ArrayRecord(exchanged_state(model)),
        num_rounds=cfg.rounds,
        timeout=cfg.round_timeout,
        train_config=spec,
        evaluate_config=ConfigRecord(dict(spec)),
        evaluate_fn=evaluate,
    )
    load_exchanged(model, result.arrays.to_torch_state_dict())
    torch.save(model.state_dict(), out / "final_model.pt")
    return history.records


def build_server_app(cfg: RunConfig | None = None) -> ServerApp:
    """A ServerApp for `cfg`, or, with None, for the config named in the run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg
        if run_cfg is None:
            path = context.run_config.get(CONFIG_KEY)
            if not path:
                raise ValueError(
                    f"run config has no {CONFIG_KEY!r}: start runs with `fedge server`"
                )
            run_cfg = RunConfig.from_mapping(json.loads(Path(str(path)).read_text()))
        run_server(grid, run_cfg)

    return server_app


# The entry point a SuperLink loads (see `fedge server`).
app = build_server_app()


def simulate(cfg: RunConfig) -> list[dict[str, Any]]:
    """Run a whole federated simulation in this process tree and return its history."""
    from fedge.client.app import app as client_app

    _quiet_flower()
    if cfg.backend == "ray":
        from fedge.server.ray_grid import RayGrid, init_ray

        init_ray(cfg.ray_address)
        grid = RayGrid(
            cfg.num_clients,
            client_cpus=cfg.client_cpus,
            client_gpus=cfg.client_gpus,
            dropout_rate=cfg.dropout_rate,
            seed=cfg.seed,
        )
        try:
            return run_server(grid, cfg)
        finally:
            grid.shutdown()
    if cfg.backend == "local":
        from fedge.server.local_grid import LocalGrid

        return run_server(LocalGrid(client_app, cfg.num_clients), cfg)
    if cfg.backend == "flower":
        from flwr.simulation import run_simulation

        from fedge.server.history import load_history

        run_simulation(
            server_app=build_server_app(cfg),
            client_app=client_app,
            num_supernodes=cfg.num_clients,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
        return load_history(cfg.out)
    raise ValueError(f"backend {cfg.backend!r} is not known")


def _quiet_flower() -> None:
    """Flower logs every sampling step at INFO; fedge prints its own progress."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
