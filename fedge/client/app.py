"""A Flower ClientApp built from any fedge Task.

The server sends, with each instruction, the run's spec (task, partition scheme, local
hyper-parameters) in the ConfigRecord; the node's own `node_config` says which partition
it holds and may override the device's budget (`max-train-seconds`) and data folder. A
node without a partition owns its data: it trains on all of its `data-dir` (the task's
real format), evaluates on that folder's test split, and reports its label counts (never
samples) so the server measures its label skew.
The same app runs in a real SuperNode, in Flower's simulation and in fedge's grids.
"""

from __future__ import annotations

import functools
import json
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import Dataset

from fedge.client.faults import faulty_arrays
from fedge.data.shared import Federation, client_split, federation
from fedge.data.stats import client_emds
from fedge.faults import Fault, fault_for, parse_fault
from fedge.strategies.dp import DP_WEIGHT, KEY_CLIPPING_NORM, clip_update
from fedge.strategies.registry import client_algorithm
from fedge.tasks import Task, TrainConfig, build_task
from fedge.tasks.base import exchanged_state, load_exchanged

LABEL_COUNTS = "label_counts"  # metric: a device's examples per label, index = label


@dataclass(frozen=True)
class RunSpec:
    """What the server tells every client about the run (hashable: it keys the caches)."""

    task: str
    task_options: str  # JSON, sorted keys
    data_dir: str
    partition: str
    seed: int
    shared_fraction: float = 0.0
    shared_per_client: float = 1.0

    @classmethod
    def from_config(cls, config: ConfigRecord, node_config: dict[str, Any]) -> RunSpec:
        task = str(config["task"])
        local_task = node_config.get("task")
        if local_task and local_task != task:
            raise ValueError(
                f"this client was started for task {local_task!r} but the server runs {task!r}; "
                "start the client with the server's --task"
            )
        return cls(
            task=task,
            task_options=str(config.get("task-options", "{}")),
            data_dir=str(node_config.get("data-dir") or config.get("data-dir", "")),
            partition=str(config.get("partition", "iid")),
            seed=int(config.get("seed", 0)),
            shared_fraction=float(config.get("shared-fraction", 0.0)),
            shared_per_client=float(config.get("shared-per-client", 1.0)),
        )


@functools.lru_cache(maxsize=4)
def load_task(spec: RunSpec) -> Task:
    """One Task (and its data) per process and run, shared by every virtual client."""
    options = json.loads(spec.task_options)
    return build_task(spec.task, data_dir=spec.data_dir or None, seed=spec.seed, **options)


@functools.lru_cache(maxsize=4)
def client_federation(spec: RunSpec, num_partitions: int) -> Federation:
    """The partitions and shared subset G, exactly as the server computes them."""
    task = load_task(spec)
    return federation(
        task.train_labels(),
        num_partitions,
        spec.partition,
        spec.seed,
        task.train_groups(),
        spec.shared_fraction,
    )


def owns_data(node_config: dict[str, Any]) -> bool:
    """A node started with its own data and no simulated partition."""
    return "partition-id" not in node_config


def client_indices(spec: RunSpec, node_config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """This node's (train, eval) indices into the task's pool; train includes its share of G."""
    pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if not 0 <= pid < num:
        raise ValueError(f"partition-id {pid} is outside 0..{num - 1}")
    fed = client_federation(spec, num)
    return client_split(fed, pid, spec.seed, spec.shared_per_client)


def client_data(spec: RunSpec, node_config: dict[str, Any]) -> tuple[Task, Dataset, Dataset]:
    """The task plus this node's local train and evaluation splits."""
    task = load_task(spec)
    if owns_data(node_config):
        if not spec.data_dir:
            raise ValueError("this device has no partition and no data-dir: start it with one")
        return task, task.train_dataset(), task.test_dataset()
    train_idx, eval_idx = client_indices(spec, node_config)
    return task, task.train_dataset(train_idx), task.train_dataset(eval_idx)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def model_from(task: Task, arrays: ArrayRecord, device: torch.device) -> nn.Module:
    """The task's model holding the global weights that arrived with the message."""
    model = task.build_model()
    load_exchanged(model, arrays.to_torch_state_dict())
    return model.to(device)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (what a device would have to hold)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def train_config(config: ConfigRecord, node_config: dict[str, Any], pid: int) -> TrainConfig:
    """Local hyper-parameters from the server, the budget from the node if it sets one."""
    budget = node_config.get("max-train-seconds", config.get("max-train-seconds", 0.0))
    rnd = int(config.get("server-round", 1))
    return TrainConfig(
        epochs=int(config.get("local-epochs", 1)),
        batch_size=int(config.get("batch-size", 32)),
        lr=float(config.get("lr", 0.05)) * float(config.get("lr-decay", 1.0)) ** (rnd - 1),
        momentum=float(config.get("momentum", 0.0)),
        max_seconds=float(budget),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        seed=int(config.get("seed", 0)) * 1_000_003 + pid * 1009 + rnd,
    )


def client_fault(config: ConfigRecord, node_config: dict[str, Any]) -> Fault | None:
    """The fault this node simulates: its own `fault` node config, else the run's `faults`
    (which name partitions: a device that owns its data has none)."""
    if node_config.get("fault"):
        return parse_fault(str(node_config["fault"]))
    if owns_data(node_config):
        return None
    return fault_for(
        str(config.get("faults", "")),
        int(node_config["partition-id"]),
        int(node_config["num-partitions"]),
        int(config.get("seed", 0)),
    )


def outgoing_arrays(
    model: nn.Module, sent: ArrayRecord, config: ConfigRecord, fault: Fault | None
) -> ArrayRecord:
    """The weights this client sends: clipped for differential privacy if the server asks,
    then corrupted if the node simulates a fault."""
    state = exchanged_state(model.to("cpu"))
    if KEY_CLIPPING_NORM not in config and fault is None:
        return ArrayRecord(state)
    global_state = sent.to_torch_state_dict()
    if KEY_CLIPPING_NORM in config:
        state = clip_update(state, global_state, float(config[KEY_CLIPPING_NORM]))
    return faulty_arrays(fault, state, global_state) if fault else ArrayRecord(state)


def label_skew_metrics(task: Task, spec: RunSpec, node_config: dict[str, Any]) -> dict[str, Any]:
    """A partition's `emd` against the whole pool; a device's own data: its `label_counts`
    (the server, holding the reference distribution, computes the EMD)."""
    labels = task.train_labels()
    if owns_data(node_config):
        return {LABEL_COUNTS: np.bincount(labels).astype(int).tolist()}
    train_idx, _ = client_indices(spec, node_config)
    return {"emd": float(client_emds(labels, [train_idx])[0])}


def arrival_metrics(msg: Message, entered: float, loaded: float) -> dict[str, float]:
    """How long the instruction took to reach the ClientApp after the server made it
    (`wait_seconds`; one clock on one machine, else clock skew counts), and how long the
    ClientApp took from then to its first compute (`first_compute_seconds`: task, data and
    model ready)."""
    return {
        "wait_seconds": max(0.0, entered - msg.metadata.created_at),
        "first_compute_seconds": loaded - entered,
    }


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on the local partition and reply with weights and device metrics."""
    entered = time.time()
    config = msg.content["config"]
    spec = RunSpec.from_config(config, context.node_config)
    task, train_data, _ = client_data(spec, context.node_config)
    device = resolve_device(str(config.get("device", "cpu")))
    model = model_from(task, msg.content["arrays"], device)
    seat = (
        context.node_id if owns_data(context.node_config) else context.node_config["partition-id"]
    )
    cfg = train_config(config, context.node_config, int(seat))
    algorithm = client_algorithm(str(config.get("algorithm", "")))
    if algorithm:
        algorithm.prepare(model, msg.content, context.state, cfg)
    loaded, started = time.time(), time.perf_counter()
    report = task.train(model, train_data, cfg)
    extra_arrays, extra_metrics = (
        algorithm.finish(model, report, context.state) if algorithm else ({}, {})
    )
    fault = client_fault(config, context.node_config)
    arrays = outgoing_arrays(model, msg.content["arrays"], config, fault)
    metrics = MetricRecord(
        {
            "num-examples": len(train_data),
            "train_loss": report.loss,
            "train_seconds": time.perf_counter() - started,
            **arrival_metrics(msg, entered, loaded),
            "peak_rss_mb": peak_rss_mb(),
            "examples_seen": report.num_examples,
            "steps": report.steps,
            "stopped_early": int(report.stopped_early),
            "update_bytes": sum(a.count_bytes() for a in (arrays, *extra_arrays.values())),
            **label_skew_metrics(task, spec, context.node_config),
            **extra_metrics,
        }
    )
    if KEY_CLIPPING_NORM in config:
        metrics[DP_WEIGHT] = 1.0
    content = RecordDict({"arrays": arrays, **extra_arrays, "metrics": metrics})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the node's held-out local split."""
    entered = time.time()
    config = msg.content["config"]
    spec = RunSpec.from_config(config, context.node_config)
    task, _, eval_data = client_data(spec, context.node_config)
    model = model_from(
        task, msg.content["arrays"], resolve_device(str(config.get("device", "cpu")))
    )
    loaded, started = time.time(), time.perf_counter()
    result = task.evaluate(model, eval_data)
    metrics = {k: float(v) for k, v in result.items() if k != "num_examples"}
    metrics["num-examples"] = len(eval_data)
    metrics["eval_seconds"] = time.perf_counter() - started
    metrics.update(arrival_metrics(msg, entered, loaded))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
