"""FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation").

Clients train concurrently and asynchronously; the server adds each arriving update
Delta_i = w_i - w_(tau_i) (the client's model minus the global model it started from, tau_i
that model's version) into a buffer, weighted by its staleness s(t - tau_i) with the paper's
s(tau) = 1 / sqrt(1 + tau). When the buffer holds K updates the server steps,
w <- w + eta_g * (1/K) sum_i s(t - tau_i) Delta_i, the version t grows by one, and the
buffer empties (Algorithm 1; the paper's Delta is w_(tau) - w_i with a minus in the step).

On Flower's synchronous loop one round is one server step. `configure_train` starts new
clients until `concurrency` are in flight, each with the current model and the strategy's
virtual time (`virtual-now`); the engine runs them at once and the virtual clock stamps each
reply with its device's round time, so their updates arrive at start + that time, in that
order, whatever the host did. Every reply still passes the server's validation when it
comes back, as in synchronous rounds; faults and per-node state are the clients' as always.
Without a virtual clock every client takes no time and updates arrive in the order sent.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedge.errors import ConfigError
from fedge.wire import METRICS, SERVER_ROUND, VIRTUAL_NOW, VIRTUAL_SECONDS, number


def staleness_weight(staleness: int) -> float:
    """The paper's s(tau) = 1 / sqrt(1 + tau)."""
    return 1.0 / math.sqrt(1.0 + staleness)


@dataclass(order=True)
class InFlight:
    """A client's update, ordered by when it reaches the server."""

    arrives: float
    seq: int
    node: int = field(compare=False)
    version: int = field(compare=False)  # the global model version it trained from
    delta: dict[str, np.ndarray] = field(compare=False)
    metrics: MetricRecord = field(compare=False)


class FedBuff(FedAvg):
    """FedAvg's sampling and metrics, FedBuff's buffered asynchronous aggregation.

    buffer_size: K, the updates per server step. server_lr: eta_g. concurrency: clients
    training at once (0: as many as a synchronous round would sample).
    """

    def __init__(
        self, buffer_size: int = 10, server_lr: float = 1.0, concurrency: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if buffer_size < 1 or server_lr <= 0 or concurrency < 0:
            raise ValueError(
                f"buffer_size must be >= 1, server_lr > 0 and concurrency >= 0; got "
                f"{buffer_size}, {server_lr}, {concurrency}"
            )
        self.buffer_size, self.server_lr, self.concurrency = buffer_size, server_lr, concurrency
        self.now = 0.0  # virtual seconds: when the last server step happened
        self.version = 0
        self.in_flight: list[InFlight] = []
        self.sent: dict[str, np.ndarray] = {}
        self.seq = 0
        self.staleness: list[int] = []  # of the updates in the last server step

    # --- the protocol's steps -------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Start clients until `concurrency` train at once, from the current model."""
        online = list(grid.get_node_ids())
        if not self.concurrency:
            self.concurrency = max(int(len(online) * self.fraction_train), self.min_train_nodes)
        if self.buffer_size > self.concurrency:
            raise ConfigError(
                f"strategy fedbuff: buffer_size {self.buffer_size} is more than the "
                f"{self.concurrency} clients training at once; it would never fill"
            )
        busy = {u.node for u in self.in_flight}
        idle = [n for n in online if n not in busy]
        start = random.sample(idle, min(len(idle), self.concurrency - len(self.in_flight)))
        config[SERVER_ROUND] = server_round
        config[VIRTUAL_NOW] = self.now
        self.sent = {k: v.numpy() for k, v in arrays.items()}
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, start, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Buffer the new updates by arrival time; step once K have arrived."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        for msg in valid:
            self.buffer(msg)
        if len(self.in_flight) < self.buffer_size:
            self.staleness = []
            return None, None  # too many failed: wait for more in the next round
        arrived = [heapq.heappop(self.in_flight) for _ in range(self.buffer_size)]
        return self.step(arrived)

    def buffer(self, reply: Message) -> None:
        metrics = reply.content.metric_records[METRICS]
        local = reply.content.array_records[self.arrayrecord_key]
        delta = {k: local[k].numpy() - base for k, base in self.sent.items()}
        arrives = self.now + number(metrics, VIRTUAL_SECONDS, 0.0)
        self.seq += 1
        heapq.heappush(
            self.in_flight,
            InFlight(arrives, self.seq, reply.metadata.src_node_id, self.version, delta, metrics),
        )

    def step(self, arrived: list[InFlight]) -> tuple[ArrayRecord, MetricRecord | None]:
        """w <- w + eta_g (1/K) sum s(staleness) Delta; the clock moves to the K-th arrival."""
        self.staleness = [self.version - u.version for u in arrived]
        weights = [staleness_weight(s) for s in self.staleness]
        new = {}
        for key, w in self.sent.items():
            update = sum(a * u.delta[key] for a, u in zip(weights, arrived, strict=True))
            new[key] = (w + self.server_lr * update / len(arrived)).astype(w.dtype)
        self.now = arrived[-1].arrives
        self.version += 1
        contents = [RecordDict({METRICS: u.metrics}) for u in arrived]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return ArrayRecord(array_dict={k: Array(v) for k, v in new.items()}), metrics

    def round_metrics(self) -> dict[str, Any]:
        """For the round's history record: the virtual time, the model version and the
        staleness of the updates the last step applied (their counts by staleness)."""
        counts = np.bincount(self.staleness).tolist() if self.staleness else []
        return {
            "virtual_time": self.now,
            "model_version": self.version,
            "in_flight": len(self.in_flight),
            "staleness_mean": float(np.mean(self.staleness)) if self.staleness else None,
            "staleness_max": max(self.staleness) if self.staleness else None,
            "staleness_counts": counts,
        }
