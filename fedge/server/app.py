"""The fedge ServerApp: a strategy and a Task, run on any Grid.

`run_server(grid, cfg)` is the whole server side: wait for the clients, run the strategy's
rounds (Flower's own loop, untouched), evaluate the global model centrally after every
round, and write `history.json`, a checkpoint per round and `history.png` into `cfg.out`.
The same function runs under a real SuperLink (`fedge server`), under Flower's simulation
and on fedge's own grids (`fedge.simulation`); this module imports no engine and no client.
Replies pass through a `RoundObserver` (fedge.server.observer) that screens every update;
`History` turns each round into one record.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from rich.console import Console

from fedge.config import RunConfig
from fedge.data.divergence import (
    fedavg_round_steps,
    run_federation,
    shadow_sgd,
    warm_up,
    weight_divergence,
)
from fedge.files import atomic_write_bytes
from fedge.server.checkpoint import resume_point, save_round
from fedge.server.history import History, load_history
from fedge.server.observer import PassThroughGrid, RoundObserver, update_check
from fedge.server.polling import PromptGrid
from fedge.server.preflight import check_partitions
from fedge.strategies import build_strategy
from fedge.strategies.dp import privacy_spent, with_dp
from fedge.strategies.oort import with_oort
from fedge.strategies.registry import round_metrics
from fedge.strategies.secagg import SecAggPlus
from fedge.tasks import Task, build_task
from fedge.tasks.base import exchanged_state, load_exchanged
from fedge.wire import DP_WEIGHT, ClientSpec, MetricValues

CONFIG_KEY = "fedge-config"  # run_config key holding the path of the run's config JSON
console = Console(highlight=False, soft_wrap=True)


class Resumed(Strategy):
    """Runs `strategy` with rounds 1..n of Flower's loop as rounds offset+1..offset+n, so
    a resumed run's clients see the true round (learning-rate decay, seeds)."""

    def __init__(self, strategy: Strategy, offset: int) -> None:
        self.strategy, self.offset = strategy, offset

    def configure_train(self, server_round: int, *args: Any) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.offset, *args)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, *args: Any) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, *args)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Any:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.strategy.summary()


def wait_for_nodes(grid: Grid, expected: int, timeout: float, poll: float = 0.5) -> int:
    """Block until `expected` nodes are connected; Flower would otherwise sample too early."""
    deadline = time.monotonic() + timeout
    last_seen = -1
    while True:
        nodes = grid.population() if isinstance(grid, PassThroughGrid) else grid.get_node_ids()
        seen = len(list(nodes))
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
    """Strategy sampling arguments: `sampled_per_round` clients a round while all are
    connected, proportionally fewer when some have died (Flower would otherwise wait for
    the dead to come back). fedge waits for all clients itself before round 1. Under a
    virtual clock, `over_select` x that many of the nodes online (the clock keeps enough)."""
    k, n = cfg.sampled_per_round, cfg.num_clients
    n_eval = math.ceil(cfg.eval_fraction * k)
    hair = 1e-9  # Flower takes int(connected * fraction): k / n * n may round down to k - 1
    if cfg.devices:  # the virtual clock offers only online nodes: take exactly F x K of them
        return {
            "fraction_train": hair,
            "min_train_nodes": math.ceil(cfg.over_select * k),
            "fraction_evaluate": hair if n_eval else 0.0,
            "min_evaluate_nodes": n_eval,
            "min_available_nodes": 1,
        }
    return {
        "fraction_train": min(1.0, k / n + hair),
        "min_train_nodes": 1,
        "fraction_evaluate": min(1.0, n_eval / n + hair) if n_eval else 0.0,
        "min_evaluate_nodes": 1 if n_eval else 0,
        "min_available_nodes": 1,
    }


def progress_line(record: dict[str, Any], rounds: int, metric: str) -> str:
    value = record.get(metric)
    shown = f"{value:.4f}" if isinstance(value, float) else "n/a"
    loss = record.get("loss")
    return (
        f"round {record['round']}/{rounds}  {metric} {shown}  "
        f"loss {loss:.4f}  clients {record.get('num_clients', 0)}"
        f" ({record.get('failures', 0)} failed)  {record['seconds']:.1f} s"
        + (f"  virtual {record['virtual_time']:.1f} s" if "virtual_time" in record else "")
    )


def build_run_strategy(cfg: RunConfig) -> Strategy:
    """The configured strategy, wrapped for differential privacy if `dp_noise` > 0, in
    Oort's selector with `selection = "oort"`, and for secure aggregation (outermost: it
    masks what DP's clients clipped) if asked."""
    options = dict(cfg.strategy_options)
    if cfg.dp_noise > 0:
        options.setdefault("weighted_by_key", DP_WEIGHT)  # equal weights, as DP accounting needs
    strategy = build_strategy(cfg.strategy, options, sampling(cfg), lr=cfg.lr)
    if cfg.dp_noise > 0:
        strategy = with_dp(
            strategy,
            cfg.dp_noise,
            cfg.dp_clip,
            cfg.sampled_per_round,
            population=cfg.num_clients,
            delta=cfg.dp_delta,
        )
    if cfg.selection == "oort":
        strategy = with_oort(strategy, cfg.selection_options, cfg.seed)
    if cfg.secure_aggregation:
        strategy = SecAggPlus(
            strategy,
            threshold=cfg.secagg_threshold,
            clip_range=cfg.secagg_clip_range,
            quantization_bits=cfg.secagg_quantization,
            timeout=cfg.round_timeout,
        )
    return strategy


@dataclass
class Prepared:
    """A run that passed every check that can run before any work."""

    task: Task
    strategy: Strategy


def prepare(cfg: RunConfig) -> Prepared:
    """The config checked, the task built (its options and data checked), the strategy
    built, the partitions cut as the clients will cut them; ConfigError if any fails."""
    cfg.validate()
    task = build_task(cfg.task, data_dir=cfg.data_dir, seed=cfg.seed, **cfg.task_options)
    strategy = build_run_strategy(cfg)
    check_partitions(task, cfg)
    return Prepared(task, strategy)


class RunStopped(Exception):
    """Raised out of Flower's loop when too many rounds in a row aggregated nothing."""


def run_server(
    grid: Grid, cfg: RunConfig, prepared: Prepared | None = None
) -> list[dict[str, Any]]:
    """Run all rounds on `grid` and return the history (also written to `cfg.out`).

    `prepared`: the checked task and strategy (else `prepare(cfg)` runs here). With
    `cfg.resume`, continue from the last intact round found in `cfg.out`. A run whose
    last `cfg.max_failed_rounds` rounds aggregated no update stops, saying why.
    """
    prepared = prepared or prepare(cfg)
    task, strategy, done = prepared.task, prepared.strategy, 0
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model = task.build_model()
    test_data = task.test_dataset()
    history = History(out, metric=task.metric, labels=task.train_labels())
    if cfg.resume:
        records = load_history(out) if (out / "history.json").exists() else []
        done, saved, history.records = resume_point(out, model, records)
        strategy = saved or strategy
        console.print(f"fedge: resuming {out} after round {done} of {cfg.rounds}")
        if done >= cfg.rounds:  # the run had finished; it may have died before its last save
            torch.save(model.state_dict(), out / "final_model.pt")
            return history.records
    saved_cfg = {**cfg.to_dict(), "resume": False, "overwrite": False}
    atomic_write_bytes(out / "config.json", json.dumps(saved_cfg, indent=2).encode())
    spec = ClientSpec.from_run(cfg)
    fed = run_federation(task, cfg) if cfg.warmup_epochs or cfg.track_divergence else None
    if fed is not None and cfg.warmup_epochs and not done:
        report = warm_up(task, model, cfg, fed)
        console.print(
            f"warm-up on G: {len(fed.shared)} samples, {cfg.warmup_epochs} epochs, "
            f"loss {report.loss:.4f}"
        )
    shadow = shadow_sgd(task, model, cfg, fed) if fed is not None and cfg.track_divergence else None
    # under secure aggregation the server never sees an update to check: clipping bounds it
    check = None if cfg.secure_aggregation else update_check(model, cfg.max_update_norm)
    observer = RoundObserver(grid, check=check)
    wait_for_nodes(observer, cfg.num_clients, timeout=cfg.round_timeout)
    random.seed(cfg.seed * 1_000_003 + done)  # Flower samples nodes with the global `random`
    console.print(
        f"fedge: task {cfg.task}, strategy {type(strategy).__name__}, "
        f"{cfg.sampled_per_round}/{cfg.num_clients} clients a round, {cfg.rounds} rounds -> {out}"
    )
    clock = {"t": time.perf_counter()}

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Centralized evaluation, and the end-of-round bookkeeping Flower calls us for."""
        server_round += done
        load_exchanged(model, arrays.to_torch_state_dict())
        metrics: MetricValues = {**task.evaluate(model, test_data)}
        metrics.pop("num_examples", None)
        if server_round == done:
            start = f"round {done} model" if done else "initial model"
            console.print(f"{start}: {task.metric} {metrics.get(task.metric, math.nan):.4f}")
        else:
            replies = observer.take_round()
            extra = {**privacy_spent(strategy), **round_metrics(strategy)}
            if shadow is not None:  # Zhao: T local steps <-> T SGD steps
                steps = fedavg_round_steps(replies.train)
                shadow_state = shadow.step(server_round, steps, spec.round_lr(server_round))
                extra.update(weight_divergence(arrays, shadow_state))
            seconds = time.perf_counter() - clock["t"]
            record = history.round_record(server_round, metrics, replies, extra, seconds)
            save_round(out, server_round, model, strategy)
            history.append(record)
            console.print(progress_line(record, cfg.rounds, task.metric))
            failed = history.failed_rounds_in_a_row()
            if cfg.max_failed_rounds and failed >= cfg.max_failed_rounds:
                raise RunStopped(
                    f"fedge: stopped after round {server_round}: {failed} rounds in a row "
                    f"aggregated no update (--max-failed-rounds {cfg.max_failed_rounds}); "
                    f"the last round's failures: {'; '.join(record['failure_reasons'][:3])}"
                )
        clock["t"] = time.perf_counter()
        return MetricRecord(metrics)

    try:
        (Resumed(strategy, done) if done else strategy).start(
            grid=observer,
            initial_arrays=ArrayRecord(exchanged_state(model)),
            num_rounds=cfg.rounds - done,
            timeout=cfg.round_timeout,
            train_config=spec.to_record(),
            evaluate_config=spec.to_record(),
            evaluate_fn=evaluate,
        )
    except RunStopped as stop:
        console.print(str(stop))
    # `evaluate` loaded every round's global model into `model`: the last one is the result
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
        run_server(PromptGrid(grid), run_cfg)  # no fixed 3 s between pulls

    return server_app


# The entry point a SuperLink loads (see `fedge server`).
app = build_server_app()
