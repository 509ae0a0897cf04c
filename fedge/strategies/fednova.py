"""FedNova (Wang et al. 2020): normalized averaging removes the objective inconsistency
that unequal local work (steps tau_k, momentum) causes under FedAvg.

Client k reports a_k, the sum of the weights its local optimizer put on its gradients
(tau_k for plain SGD; [tau - rho(1 - rho^tau)/(1 - rho)] / (1 - rho) with momentum rho).
The server averages the normalized updates d_k = (x - w_k) / a_k with weights
p_k = n_k / n and steps by tau_eff = sum_k p_k a_k:  x <- x - tau_eff * sum_k p_k d_k.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedge.strategies.registry import ClientAlgorithm
from fedge.tasks import TrainConfig, TrainReport
from fedge.wire import ALGORITHM, METRICS, number

NORM = "fednova-a"  # the client's a_k, a metric of its reply


def local_norm(steps: int, momentum: float) -> float:
    """a_k: how much local SGD (with heavy-ball momentum rho) weighted its gradients."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


class FedNova(FedAvg):
    """FedAvg with FedNova's normalized aggregation."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[ALGORITHM] = "fednova"
        self.current = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        contents: list[RecordDict] = [m.content for m in valid]
        rows = [m.content.metric_records[METRICS] for m in valid]
        norms = [number(r, NORM) for r in rows if number(r, NORM) > 0]
        if not valid or len(norms) < len(rows):
            return super().aggregate_train(server_round, valid)  # nobody stepped: plain mean
        n = np.array([number(r, self.weighted_by_key) for r in rows])
        p = n / n.sum()
        tau_eff = float(np.dot(p, norms))
        x = {k: v.numpy() for k, v in self.current.items()}
        new = {}
        for key, x_k in x.items():
            d = sum(
                p_i * (x_k - c.array_records[self.arrayrecord_key][key].numpy()) / a_i
                for p_i, a_i, c in zip(p, norms, contents, strict=True)
            )
            new[key] = (x_k - tau_eff * d).astype(x_k.dtype)
        arrays = ArrayRecord(array_dict={k: Array(v) for k, v in new.items()})
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


class FedNovaClient(ClientAlgorithm):
    """The client half: report a_k from the steps taken and the momentum used."""

    def prepare(
        self, model: nn.Module, content: RecordDict, state: RecordDict, cfg: TrainConfig
    ) -> None:
        self.momentum = cfg.momentum

    def finish(
        self, model: nn.Module, report: TrainReport, state: RecordDict
    ) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
        return {}, {NORM: local_norm(report.steps, self.momentum)}
