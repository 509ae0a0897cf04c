"""A Flower ClientApp built from any fedge Task.

The server sends, with each instruction, the run's `ClientSpec` (task, partition scheme,
local hyper-parameters; fedge.wire) in the ConfigRecord; the node's own `node_config` says
which partition it holds and may override the device's budget and data folder. A node
without a partition owns its data: it trains on all of its data folder (the task's real
format), evaluates on that folder's test split, and reports its label counts (never
samples) so the server measures its label skew.
The same app runs in a real SuperNode, in Flower's simulation and in fedge's grids.
"""

from __future__ import annotations

import dataclasses
import functools
import resource
import sys
import time
from collections.abc import Mapping
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
from fedge.edge.packing import packing_mod
from fedge.faults import Fault, fault_for, parse_fault
from fedge.strategies.dp import clip_update
from fedge.strategies.registry import client_algorithm
from fedge.strategies.secagg import secaggplus_mod
from fedge.tasks import Task, TrainConfig, build_task
from fedge.tasks.base import exchanged_state, load_exchanged, num_samples
from fedge.wire import (
    ALGORITHM,
    ARRAYS,
    CLIENT_DEFAULTS,
    CLIPPING_NORM,
    CONFIG,
    DP_WEIGHT,
    EMD,
    EVAL_SECONDS,
    EXAMPLES_SEEN,
    FIRST_COMPUTE_SECONDS,
    LABEL_COUNTS,
    METRICS,
    NODE_FAULT,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    PEAK_RSS_MB,
    PROXIMAL_MU,
    SERVER_ROUND,
    STEPS,
    STOPPED_EARLY,
    TRAIN_LOSS,
    TRAIN_LOSS_SQUARED,
    TRAIN_SECONDS,
    UPDATE_BYTES,
    WAIT_SECONDS,
    ClientSpec,
    MetricValues,
    number,
)

# what nodes and rounds may set apart; the rest of a spec decides what a process loads
LOCAL_TRAINING: tuple[str, ...] = ("local_epochs", "batch_size", "lr", "lr_decay", "momentum")
LOCAL_TRAINING += ("max_train_seconds", "max_train_steps", "faults")


def loaded_part(spec: ClientSpec) -> ClientSpec:
    """`spec` without its local-training settings: the key of what a process loads once
    per run (task, data, partitions, model), so nodes with their own budgets share it."""
    return dataclasses.replace(spec, **{k: getattr(CLIENT_DEFAULTS, k) for k in LOCAL_TRAINING})


def load_task(spec: ClientSpec) -> Task:
    """One Task (and its data) per process and run, shared by every virtual client."""
    return _task(loaded_part(spec))


@functools.lru_cache(maxsize=4)
def _task(spec: ClientSpec) -> Task:
    return build_task(spec.task, data_dir=spec.data_dir or None, seed=spec.seed, **spec.options())


@functools.lru_cache(maxsize=4)
def client_federation(spec: ClientSpec, num_partitions: int) -> Federation:
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


def owns_data(node_config: Mapping[str, Any]) -> bool:
    """A node started with its own data and no simulated partition."""
    return PARTITION_ID not in node_config


def partition_of(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """(partition id, number of partitions) from the node config, checked."""
    pid, num = int(node_config[PARTITION_ID]), int(node_config[NUM_PARTITIONS])
    if not 0 <= pid < num:
        raise ValueError(f"{PARTITION_ID} {pid} is outside 0..{num - 1}")
    return pid, num


def client_indices(
    spec: ClientSpec, node_config: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """This node's (train, eval) indices into the task's pool; train includes its share of G."""
    pid, num = partition_of(node_config)
    shares = client_federation(loaded_part(spec), num)
    return client_split(shares, pid, spec.seed, spec.shared_per_client)


def client_data(
    spec: ClientSpec, node_config: Mapping[str, Any]
) -> tuple[Task, Dataset, Dataset, dict[str, Any]]:
    """The task, this node's local train and evaluation splits, and its label skew: a
    partition's EMD against the whole pool; a device's own data, its label counts (never
    samples: the server, holding the reference distribution, computes the EMD)."""
    task = load_task(spec)
    if owns_data(node_config):
        if not spec.data_dir:
            raise ValueError("this device has no partition and no data-dir: start it with one")
        counts = np.bincount(task.train_labels()).astype(int).tolist()
        return task, task.train_dataset(), task.test_dataset(), {LABEL_COUNTS: counts}
    own = task.client_data(partition_of(node_config)[0])
    if own is not None:  # a task that makes each client's data (synthetic)
        return task, own.train, own.eval, {LABEL_COUNTS: own.label_counts}
    train_idx, eval_idx = client_indices(spec, node_config)
    emd = float(client_emds(task.train_labels(), [train_idx])[0])
    return task, task.train_dataset(train_idx), task.train_dataset(eval_idx), {EMD: emd}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@functools.lru_cache(maxsize=4)
def task_model(spec: ClientSpec) -> nn.Module:
    """One model per process and run, built once: each message loads its weights into it.
    Every tensor but the frozen ones is exchanged, so nothing of a message (or of another
    virtual client) survives into the next; frozen weights are the task's own."""
    return load_task(spec).build_model().to(resolve_device(spec.device))


def model_from(spec: ClientSpec, arrays: ArrayRecord) -> nn.Module:
    """The run's model holding the global weights that arrived with the message."""
    model = task_model(loaded_part(spec))
    load_exchanged(model, arrays.to_torch_state_dict())
    model.zero_grad(set_to_none=True)
    return model


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (what a device would have to hold)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def train_config(spec: ClientSpec, config: ConfigRecord, pid: int) -> TrainConfig:
    """This round's local training: the run's settings, the strategy's proximal term, and a
    seed that differs by node and round."""
    rnd = int(number(config, SERVER_ROUND, 1))
    return TrainConfig(
        epochs=spec.local_epochs,
        batch_size=spec.batch_size,
        lr=spec.round_lr(rnd),
        momentum=spec.momentum,
        max_seconds=spec.max_train_seconds,
        max_steps=spec.max_train_steps,
        proximal_mu=number(config, PROXIMAL_MU, 0.0),
        seed=spec.seed * 1_000_003 + pid * 1009 + rnd,
    )


def client_fault(spec: ClientSpec, node_config: Mapping[str, Any]) -> Fault | None:
    """The fault this node simulates: its own `fault` node config, else the run's `faults`
    (which name partitions: a device that owns its data has none)."""
    if node_config.get(NODE_FAULT):
        return parse_fault(str(node_config[NODE_FAULT]))
    if owns_data(node_config):
        return None
    pid, num = partition_of(node_config)
    return fault_for(spec.faults, pid, num, spec.seed)


def outgoing_arrays(
    model: nn.Module, sent: ArrayRecord, config: ConfigRecord, fault: Fault | None
) -> ArrayRecord:
    """The weights this client sends: clipped for differential privacy if the server asks,
    then corrupted if the node simulates a fault."""
    state = {k: v.cpu() for k, v in exchanged_state(model).items()}
    if CLIPPING_NORM not in config and fault is None:
        return ArrayRecord(state)
    global_state = sent.to_torch_state_dict()
    if CLIPPING_NORM in config:
        state = clip_update(state, global_state, number(config, CLIPPING_NORM))
    return faulty_arrays(fault, state, global_state) if fault else ArrayRecord(state)


def arrival_metrics(msg: Message, entered: float, loaded: float) -> dict[str, float]:
    """How long the instruction took to reach the ClientApp after the server made it
    (one clock on one machine; across machines their skew counts), and how long the
    ClientApp took from then to its first compute (task, data and model ready)."""
    return {
        WAIT_SECONDS: max(0.0, entered - msg.metadata.created_at),
        FIRST_COMPUTE_SECONDS: loaded - entered,
    }


# a packed instruction (from `fedge server`) is unpacked first; then SecAgg+ stages answered
app = ClientApp(mods=[packing_mod, secaggplus_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on the local partition and reply with weights and device metrics."""
    entered = time.time()
    config = msg.content.config_records[CONFIG]
    spec = ClientSpec.from_record(config, context.node_config)
    task, train_data, _, label_skew = client_data(spec, context.node_config)
    model = model_from(spec, msg.content.array_records[ARRAYS])
    node = context.node_config
    seat = context.node_id % 1_000_003 if owns_data(node) else partition_of(node)[0]  # seeds
    cfg = train_config(spec, config, seat)
    algorithm = client_algorithm(str(config.get(ALGORITHM, "")))
    if algorithm:
        algorithm.prepare(model, msg.content, context.state, cfg)
    loaded, started = time.time(), time.perf_counter()
    report = task.train(model, train_data, cfg)
    extra_arrays, extra_metrics = (
        algorithm.finish(model, report, context.state) if algorithm else ({}, {})
    )
    fault = client_fault(spec, context.node_config)
    arrays = outgoing_arrays(model, msg.content.array_records[ARRAYS], config, fault)
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: num_samples(train_data),
            TRAIN_LOSS: report.loss,
            TRAIN_LOSS_SQUARED: report.loss_squared,
            TRAIN_SECONDS: time.perf_counter() - started,
            **arrival_metrics(msg, entered, loaded),
            PEAK_RSS_MB: peak_rss_mb(),
            EXAMPLES_SEEN: report.num_examples,
            STEPS: report.steps,
            STOPPED_EARLY: int(report.stopped_early),
            UPDATE_BYTES: sum(a.count_bytes() for a in (arrays, *extra_arrays.values())),
            **label_skew,
            **extra_metrics,
        }
    )
    if CLIPPING_NORM in config:
        metrics[DP_WEIGHT] = 1.0
    content = RecordDict({ARRAYS: arrays, **extra_arrays, METRICS: metrics})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the node's held-out local split."""
    entered = time.time()
    spec = ClientSpec.from_record(msg.content.config_records[CONFIG], context.node_config)
    task, _, eval_data, _ = client_data(spec, context.node_config)
    if num_samples(eval_data) == 0:  # its partition is too small to hold data out
        raise ValueError("this client holds no evaluation data (its partition has one sample)")
    model = model_from(spec, msg.content.array_records[ARRAYS])
    loaded, started = time.time(), time.perf_counter()
    result = task.evaluate(model, eval_data)
    metrics: MetricValues = {k: float(v) for k, v in result.items() if k != "num_examples"}
    metrics[NUM_EXAMPLES] = num_samples(eval_data)
    metrics[EVAL_SECONDS] = time.perf_counter() - started
    metrics.update(arrival_metrics(msg, entered, loaded))
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)
