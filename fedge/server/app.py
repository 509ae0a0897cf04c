"""The fedge ServerApp: a strategy and a Task, run on any Grid.

`run_server(grid, cfg)` is the whole server side: wait for the clients, run the strategy's
rounds (Flower's own loop, untouched), evaluate the global model centrally after every
round, and write `history.json`, a checkpoint per round and `history.png` into `cfg.out`.
The same function runs under a real SuperLink (`fedge server`), under Flower's simulation
and on fedge's in-process grid (`simulate`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from rich.console import Console

from fedge.compat import error_reply
from fedge.config import RunConfig
from fedge.data.shared import Federation, client_split, federation
from fedge.server.checkpoint import resume_point, save_round
from fedge.server.divergence import (
    NUM_EXAMPLES,
    ShadowSGD,
    client_drift,
    label_skew,
    weight_divergence,
)
from fedge.server.history import History, load_history, summarize_evaluate, summarize_train
from fedge.server.polling import PromptGrid
from fedge.server.validation import check_update
from fedge.strategies import build_strategy
from fedge.strategies.dp import DP_WEIGHT, privacy_spent, with_dp
from fedge.tasks import Task, TrainConfig, build_task
from fedge.tasks.base import exchanged_state, load_exchanged

CONFIG_KEY = "fedge-config"  # run_config key holding the path of the run's config JSON
console = Console(highlight=False, soft_wrap=True)


# (training reply, the instruction it answers) -> (why it must not be aggregated, or None;
# its drift ||w_k - w_t|| / ||w_t||, or None where the model could not be read)
ReplyCheck = Callable[[Message, Message], tuple[str | None, float | None]]


class RoundObserver(Grid):
    """Passes everything through to `grid`, keeping the last replies of each message type.

    The strategy never knows it is there; the server reads device metrics and failures
    from what it saw. Training replies that fail `check` reach the strategy as error
    replies naming the reason (so they are never aggregated), counted in `rejected`; the
    accepted ones' drift (which `check` measures) makes the round's drift metrics.
    """

    def __init__(self, grid: Grid, check: ReplyCheck | None = None) -> None:
        self.grid = grid
        self.check = check
        self.last: dict[str, tuple[list[Message], int]] = {}  # kind -> (replies, unanswered)
        self.rejected = 0  # training replies refused since the last take_rejected()
        self.drift: list[tuple[float, float]] = []  # (drift, n_k) of accepted training replies

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
            if kind == MessageType.TRAIN and self.check is not None:
                replies = self.screen(messages, replies)
            self.last[kind] = (replies, len(messages) - len(replies))
        return replies

    def screen(self, messages: list[Message], replies: list[Message]) -> list[Message]:
        """Replace each reply that fails the check by an error reply naming the reason."""
        sent = {m.metadata.dst_node_id: m for m in messages}
        screened = []
        for reply in replies:
            node = reply.metadata.src_node_id
            reason, drift = self.check(reply, sent[node]) if node in sent else (None, None)
            if drift is not None and not reason:
                metrics = reply.content.metric_records.get("metrics", {})
                self.drift.append((drift, float(metrics.get(NUM_EXAMPLES, 1.0))))
            if reason:
                console.print(f"rejected the update of node {node}: {reason}")
                self.rejected += 1
                reply = error_reply(sent[node], f"update rejected by the server: {reason}")
            screened.append(reply)
        return screened

    def take(self, kind: str) -> tuple[list[Message], int]:
        """The last round's replies of `kind`, and how many nodes never answered."""
        return self.last.pop(kind, ([], 0))

    def take_rejected(self) -> int:
        rejected, self.rejected = self.rejected, 0
        return rejected

    def take_drift(self) -> dict[str, float]:
        """The last round's `drift_mean` and `drift_max` (see `client_drift`)."""
        drift, self.drift = self.drift, []
        return client_drift([d for d, _ in drift], [n for _, n in drift])


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
    """Strategy sampling arguments: `sampled_per_round` clients a round while all are
    connected, proportionally fewer when some have died (Flower would otherwise wait for
    the dead to come back). fedge waits for all clients itself before round 1."""
    k, n = cfg.sampled_per_round, cfg.num_clients
    n_eval = math.ceil(cfg.eval_fraction * k)
    hair = 1e-9  # Flower takes int(connected * fraction): k / n * n may round down to k - 1
    return {
        "fraction_train": min(1.0, k / n + hair),
        "min_train_nodes": 1,
        "fraction_evaluate": min(1.0, n_eval / n + hair) if n_eval else 0.0,
        "min_evaluate_nodes": 1 if n_eval else 0,
        "min_available_nodes": 1,
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
            "faults": cfg.faults,
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


def progress_line(record: dict[str, Any], rounds: int, metric: str) -> str:
    value = record.get(metric)
    shown = f"{value:.4f}" if isinstance(value, float) else "n/a"
    loss = record.get("loss")
    return (
        f"round {record['round']}/{rounds}  {metric} {shown}  "
        f"loss {loss:.4f}  clients {record.get('num_clients', 0)}"
        f" ({record.get('failures', 0)} failed)  {record['seconds']:.1f} s"
    )


def build_run_strategy(cfg: RunConfig) -> Strategy:
    """The configured strategy, wrapped for differential privacy if `dp_noise` > 0."""
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
    return strategy


def update_check(cfg: RunConfig, model: torch.nn.Module) -> ReplyCheck:
    """Validation of a training reply against the server's model and the weights sent.

    A round's instructions share one ArrayRecord: it is decoded once, not once per reply.
    """
    reference = ArrayRecord(exchanged_state(model))
    decoded: dict[str, Any] = {"record": None, "values": None}

    def check(reply: Message, instruction: Message) -> str | None:
        sent = instruction.content["arrays"]
        if decoded["record"] is not sent:
            decoded.update(record=sent, values={k: a.numpy() for k, a in sent.items()})
        return check_update(reply, decoded["values"], reference, cfg.max_update_norm)

    return check


def run_server(grid: Grid, cfg: RunConfig, task: Task | None = None) -> list[dict[str, Any]]:
    """Run all rounds on `grid` and return the history (also written to `cfg.out`).

    With `cfg.resume`, continue from the last intact round found in `cfg.out`.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "resume": False}, indent=2))
    task = task or build_task(cfg.task, data_dir=cfg.data_dir, seed=cfg.seed, **cfg.task_options)
    model = task.build_model()
    test_data = task.test_dataset()
    history = History(out, metric=task.metric)
    strategy, done = build_run_strategy(cfg), 0
    if cfg.resume:
        records = load_history(out) if (out / "history.json").exists() else []
        done, saved, history.records = resume_point(out, model, records)
        strategy = saved or strategy
        console.print(f"fedge: resuming {out} after round {done} of {cfg.rounds}")
        if done >= cfg.rounds:  # the run had finished; it may have died before its last save
            torch.save(model.state_dict(), out / "final_model.pt")
            return history.records
    fed = server_federation(task, cfg) if cfg.warmup_epochs or cfg.track_divergence else None
    if cfg.warmup_epochs and not done:
        warm_up(task, model, cfg, fed)
    shadow = shadow_sgd(task, model, cfg, fed) if cfg.track_divergence else None
    observer = RoundObserver(grid, check=update_check(cfg, model))
    wait_for_nodes(grid, cfg.num_clients, timeout=cfg.round_timeout)
    console.print(
        f"fedge: task {cfg.task}, strategy {type(strategy).__name__}, "
        f"{cfg.sampled_per_round}/{cfg.num_clients} clients a round, {cfg.rounds} rounds -> {out}"
    )
    clock = {"t": time.perf_counter()}
    reference = np.bincount(task.train_labels()) / len(task.train_labels())  # devices' EMD

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Centralized evaluation, and the end-of-round bookkeeping Flower calls us for."""
        server_round += done
        load_exchanged(model, arrays.to_torch_state_dict())
        metrics = task.evaluate(model, test_data)
        metrics.pop("num_examples", None)
        if server_round == done:
            start = f"round {done} model" if done else "initial model"
            console.print(f"{start}: {task.metric} {metrics.get(task.metric, math.nan):.4f}")
            clock["t"] = time.perf_counter()
            return MetricRecord(metrics)
        replies, unanswered = observer.take(MessageType.TRAIN)
        train = summarize_train(replies)
        train["failures"] += unanswered  # a node that never answered failed too
        if unanswered:
            train["failure_reasons"].append(f"{unanswered} node(s) never answered")
        record = {"round": server_round, **metrics, **train, **label_skew(replies, reference)}
        record["rejected"] = observer.take_rejected()
        record.update(observer.take_drift())
        record.update(privacy_spent(strategy))
        if shadow is not None:
            # Zhao: T local steps <-> T SGD steps; FedAvg weights client k by n_k, so do we
            ok = [m.content["metrics"] for m in replies if not m.has_error()]
            weights = [float(r["num-examples"]) for r in ok]
            steps = round(np.average([r["steps"] for r in ok], weights=weights)) if ok else 0
            lr = cfg.lr * cfg.lr_decay ** (server_round - 1)
            record.update(weight_divergence(arrays, shadow.step(server_round, steps, lr)))
        record.update(summarize_evaluate(observer.take(MessageType.EVALUATE)[0]))
        record["seconds"] = time.perf_counter() - clock["t"]
        save_round(out, server_round, model, strategy)
        history.append(record)
        console.print(progress_line(record, cfg.rounds, task.metric))
        clock["t"] = time.perf_counter()
        return MetricRecord(metrics)

    spec = client_config(cfg)
    result = (Resumed(strategy, done) if done else strategy).start(
        grid=observer,
        initial_arrays=ArrayRecord(exchanged_state(model)),
        num_rounds=cfg.rounds - done,
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
        run_server(PromptGrid(grid), run_cfg)  # no fixed 3 s between pulls

    return server_app


# The entry point a SuperLink loads (see `fedge server`).
app = build_server_app()
