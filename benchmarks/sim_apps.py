"""The ClientApp and ServerApp that benchmarks/simulation.py runs on both engines."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """A fixed, cheap local step: w - 0.01 * (w - partition id), so work is the transport."""
    pid = float(context.node_config["partition-id"])
    arrays = [a - 0.01 * (a - pid) for a in msg.content["arrays"].to_numpy_ndarrays()]
    metrics = MetricRecord({"num-examples": 1})
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)


def run_rounds(grid: Grid, num_nodes: int, sampled: int, rounds: int, floats: int) -> list[float]:
    """Wait for every node, then run FedAvg; returns the wall time of each round."""
    while len(list(grid.get_node_ids())) < num_nodes:
        time.sleep(0.5)
    stamps = [time.perf_counter()]

    def stamp(server_round: int, arrays: ArrayRecord) -> None:
        if server_round:
            stamps.append(time.perf_counter())

    strategy = FedAvg(
        fraction_train=sampled / num_nodes,
        min_train_nodes=sampled,
        min_available_nodes=num_nodes,
        fraction_evaluate=0.0,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(floats, np.float32)]),
        num_rounds=rounds,
        evaluate_fn=stamp,
    )
    return list(np.diff(stamps))
