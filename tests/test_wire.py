"""The wire schema: every client-facing setting is carried, with one set of defaults."""

import dataclasses
import math

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedge.client.app import app as client_app
from fedge.config import SERVER_FIELDS, RunConfig
from fedge.simulation.local_grid import NODE_ID_BASE, LocalGrid
from fedge.tasks import build_task
from fedge.wire import (
    ARRAYS,
    CONFIG,
    EXAMPLES_SEEN,
    METRICS,
    NODE_DATA_DIR,
    NODE_MAX_TRAIN_SECONDS,
    NODE_TASK,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    STEPS,
    ClientSpec,
)

CLIENT_FIELDS = {f.name for f in dataclasses.fields(ClientSpec)}


def test_every_run_setting_is_either_sent_to_clients_or_server_only():
    run_fields = {f.name for f in dataclasses.fields(RunConfig)}
    unclassified = run_fields - CLIENT_FIELDS - SERVER_FIELDS
    assert not unclassified, f"add {unclassified} to ClientSpec or to config.SERVER_FIELDS"
    assert not CLIENT_FIELDS & SERVER_FIELDS
    assert CLIENT_FIELDS <= run_fields  # a ClientSpec field is a run setting


def test_every_client_facing_field_survives_the_round_trip():
    changed = {
        "task": "kws",
        "task_options": {"fold": 2, "chunk": 8},
        "data_dir": "/data/speech",
        "partition": "dirichlet:0.3",
        "seed": 17,
        "num_clients": 40,
        "shared_fraction": 0.1,
        "shared_per_client": 0.5,
        "local_epochs": 3,
        "batch_size": 7,
        "lr": 0.01,
        "lr_decay": 0.9,
        "momentum": 0.5,
        "max_train_seconds": 4.5,
        "max_train_steps": 5,
        "device": "auto",
        "faults": "nan:0.1",
    }
    assert set(changed) == CLIENT_FIELDS, "a new ClientSpec field needs a value here"
    cfg = RunConfig.from_mapping(changed)
    sent = ClientSpec.from_run(cfg)
    received = ClientSpec.from_record(sent.to_record(), {})
    assert received == sent
    for name, value in changed.items():
        got = received.options() if name == "task_options" else getattr(received, name)
        assert got == value, name
    assert received != ClientSpec(), "every value above differs from its default"


def test_one_set_of_defaults():
    assert ClientSpec.from_record(ConfigRecord(), {}) == ClientSpec.from_run(RunConfig())


def test_the_node_wins_for_its_own_data_and_budget_and_must_run_the_servers_task():
    sent = ClientSpec.from_run(RunConfig(data_dir="/srv", max_train_seconds=9.0)).to_record()
    mine = ClientSpec.from_record(sent, {NODE_DATA_DIR: "/mine", NODE_MAX_TRAIN_SECONDS: 2.0})
    assert (mine.data_dir, mine.max_train_seconds) == ("/mine", 2.0)
    with pytest.raises(ValueError, match="started for task 'kws'"):
        ClientSpec.from_record(sent, {NODE_TASK: "kws"})


def test_a_partition_device_must_cut_the_data_as_the_server_does():
    sent = ClientSpec.from_run(RunConfig(num_clients=3)).to_record()
    assert ClientSpec.from_record(sent, {PARTITION_ID: 1, NUM_PARTITIONS: 3}).num_clients == 3
    with pytest.raises(ValueError, match="--num-partitions 5 but the server runs 3 clients"):
        ClientSpec.from_record(sent, {PARTITION_ID: 1, NUM_PARTITIONS: 5})
    ClientSpec.from_record(sent, {NODE_DATA_DIR: "/mine"})  # a device with its own data: any


def test_a_client_given_an_empty_config_trains_with_the_run_defaults():
    defaults = RunConfig()
    grid = LocalGrid(client_app, num_nodes=4)
    model = build_task(defaults.task).build_model()
    content = RecordDict({ARRAYS: ArrayRecord(model.state_dict()), CONFIG: ConfigRecord()})
    (reply,) = grid.send_and_receive([Message(content, NODE_ID_BASE, MessageType.TRAIN)])
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content[METRICS]
    n = int(metrics[NUM_EXAMPLES])
    assert n > 0
    assert metrics[EXAMPLES_SEEN] == defaults.local_epochs * n
    assert metrics[STEPS] == defaults.local_epochs * math.ceil(n / defaults.batch_size)
