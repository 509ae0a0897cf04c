"""fedge's ClientApp in one process: what it loads once and what each message brings."""

import dataclasses

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MessageType, RecordDict

from fedge.client.app import app as client_app
from fedge.client.app import task_model
from fedge.simulation.local_grid import NODE_ID_BASE, LocalGrid
from fedge.tasks import build_task
from fedge.wire import ARRAYS, CONFIG, ClientSpec


def train_reply(grid: LocalGrid, node: int, weights: dict, spec: ClientSpec) -> dict:
    content = RecordDict({ARRAYS: ArrayRecord(weights), CONFIG: spec.to_record()})
    (reply,) = grid.send_and_receive([Message(content, NODE_ID_BASE + node, MessageType.TRAIN)])
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return {k: v.numpy() for k, v in reply.content[ARRAYS].items()}


def test_the_model_is_built_once_per_run_and_each_message_starts_from_its_own_weights():
    spec = ClientSpec(num_clients=4, max_train_steps=3)
    grid = LocalGrid(client_app, num_nodes=4)
    torch.manual_seed(1)
    first = build_task(spec.task).build_model().state_dict()
    second = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in first.items()
    }
    task_model.cache_clear()
    alone = train_reply(grid, 0, first, spec)
    # another node, other weights and its own budget, then the first message again
    train_reply(grid, 1, second, dataclasses.replace(spec, max_train_steps=5))
    again = train_reply(grid, 0, first, spec)
    assert task_model.cache_info().misses == 1  # one model served all three messages
    for name, value in alone.items():
        np.testing.assert_array_equal(value, again[name], err_msg=name)
    assert any(not np.array_equal(alone[k], first[k].numpy()) for k in alone)  # it trained
