"""SCAFFOLD (Karimireddy et al. 2020): control variates correct client drift under non-IID data.

The server keeps a control variate c (an estimate of the global gradient) and sends it
with every training instruction; client k keeps its own c_k in its node state. Each local
step follows g + c - c_k instead of g. Afterwards the client sets c_k to the mean of the
raw gradients it computed this round (the paper's option II for plain SGD, and still a
gradient estimate under momentum) and returns the change of c_k; the server averages
the models as FedAvg does and moves c by |S|/N times the mean change.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedge.compat import aggregate_arrayrecords
from fedge.strategies.registry import ClientAlgorithm
from fedge.tasks import TrainConfig, TrainReport
from fedge.wire import ALGORITHM, METRICS

CONTROL = "scaffold-c"  # the server's control variate, sent with each instruction
CLIENT_CONTROL = "scaffold-ck"  # the client's control variate, kept in its node state
DELTA = "scaffold-delta"  # the change of c_k, returned with the reply


class Scaffold(FedAvg):
    """FedAvg plus SCAFFOLD's server control variate (global step size 1)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.control: dict[str, np.ndarray] | None = None
        self.num_nodes = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[ALGORITHM] = "scaffold"
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.num_nodes = len(list(grid.get_node_ids()))
        if self.control is None:
            self.control = {k: np.zeros_like(v.numpy()) for k, v in arrays.items()}
        control = ArrayRecord(array_dict={k: Array(v) for k, v in self.control.items()})
        for msg in messages:  # the messages share one RecordDict
            msg.content[CONTROL] = control
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        contents = [
            RecordDict(
                {
                    self.arrayrecord_key: m.content.array_records[self.arrayrecord_key],
                    "metrics": m.content.metric_records[METRICS],
                }
            )
            for m in valid
        ]
        arrays = aggregate_arrayrecords(contents, self.weighted_by_key)
        assert self.control is not None
        scale = len(valid) / max(self.num_nodes, len(valid)) / len(valid)
        for m in valid:
            for key, value in m.content.array_records[DELTA].items():
                self.control[key] = self.control[key] + scale * value.numpy()
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


class ScaffoldClient(ClientAlgorithm):
    """The client half: corrected gradients during training, the new c_k after it."""

    def prepare(
        self, model: nn.Module, content: RecordDict, state: RecordDict, cfg: TrainConfig
    ) -> None:
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        server = content.array_records[CONTROL]
        self.old = {k: torch.from_numpy(server[k].numpy()).zero_() for k in params}
        if CLIENT_CONTROL in state:
            stored = state.array_records[CLIENT_CONTROL]
            self.old = {k: torch.from_numpy(stored[k].numpy().copy()) for k in params}
        correction = {k: torch.from_numpy(server[k].numpy()) - self.old[k] for k in params}
        self.grad_sum = {k: torch.zeros_like(p) for k, p in params.items()}
        self.steps = 0

        def correct(_: nn.Module) -> None:
            self.steps += 1
            for k, p in params.items():
                if p.grad is not None:
                    self.grad_sum[k] += p.grad
                    p.grad += correction[k].to(p.grad.device)

        cfg.grad_hooks.append(correct)

    def finish(
        self, model: nn.Module, report: TrainReport, state: RecordDict
    ) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
        if self.steps == 0:
            new = self.old
        else:
            new = {k: (g / self.steps).cpu() for k, g in self.grad_sum.items()}
        state[CLIENT_CONTROL] = ArrayRecord(torch_state_dict=new)
        delta = ArrayRecord(torch_state_dict={k: new[k] - self.old[k] for k in new})
        return {DELTA: delta}, {}
