"""The ServerApp and ClientApp together on the in-process grid."""

import json

import plugin_strategies
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedge.client.app import app as client_app
from fedge.config import RunConfig
from fedge.server.app import run_server
from fedge.simulation import simulate
from fedge.simulation.local_grid import NODE_ID_BASE, LocalGrid
from fedge.strategies import STRATEGIES, build_strategy
from fedge.tasks import build_task
from fedge.wire import ClientSpec

# the digits CNN with two local epochs and federated evaluation, unlike the fixture's defaults
FULL = dict(task_options={}, local_epochs=2, eval_fraction=0.5)


def test_simulation_learns_and_writes_history_checkpoints_plot(run_dir, small_run):
    history = simulate(small_run(run_dir, **FULL, rounds=3))
    assert [r["round"] for r in history] == [1, 2, 3]
    assert history[-1]["accuracy"] > 0.8 > 0.1  # chance is 0.1
    for r in history:
        assert {"round", "loss", "accuracy", "num_clients", "seconds"} <= set(r)
        assert r["num_clients"] == 4 and r["failures"] == 0
        assert r["examples_seen"] == 2 * 3600  # two local epochs over 90% of 4000 images
        assert (
            r["update_bytes"]
            == 4 * ArrayRecord(build_task("digits").build_model().state_dict()).count_bytes()
        )
        assert r["train_seconds_mean"] > 0 and r["peak_rss_mb_max"] > 50
        assert r["fed_clients"] == 2 and 0 <= r["fed_accuracy"] <= 1
    on_disk = json.loads((run_dir / "history.json").read_text())
    assert on_disk == json.loads(json.dumps(history))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "round_001.pt",
        "round_002.pt",
        "round_003.pt",
    ]
    assert (run_dir / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    final = torch.load(run_dir / "final_model.pt")
    last = torch.load(run_dir / "checkpoints" / "round_003.pt")
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_clients_per_round_samples_that_many(run_dir, small_run):
    history = simulate(small_run(run_dir, num_clients=6, clients_per_round=2, eval_fraction=0))
    assert [r["num_clients"] for r in history] == [2, 2]
    assert all("fed_loss" not in r for r in history)


def test_custom_strategy_module_class_is_the_one_used(run_dir, small_run):
    plugin_strategies.CALLS.clear()
    simulate(
        small_run(
            run_dir,
            **FULL,
            strategy="plugin_strategies:CountingFedAvg",
            strategy_options={"tag": "x"},
        )
    )
    assert plugin_strategies.CALLS == [1, 2]


def test_every_registered_strategy_builds():
    sampling = {"fraction_train": 0.5, "min_train_nodes": 2, "min_available_nodes": 4}
    for name in STRATEGIES:
        assert build_strategy(name, {}, sampling).min_train_nodes == 2
    with pytest.raises(ValueError, match="no option"):
        build_strategy("fedavg", {"proximal_mu": 1.0}, sampling)
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy("fedmagic", {}, sampling)


def train_once(config: ConfigRecord) -> tuple[dict, dict]:
    """One ClientApp train call on node 0; returns (global weights, local weights)."""
    task = build_task("digits")
    weights = task.build_model().state_dict()
    grid = LocalGrid(client_app, num_nodes=4)
    content = RecordDict({"arrays": ArrayRecord(weights), "config": config})
    msg = Message(content, NODE_ID_BASE, MessageType.TRAIN)
    (reply,) = grid.send_and_receive([msg])
    assert not reply.has_error(), reply.error
    return weights, reply.content["arrays"].to_torch_state_dict()


def distance(a: dict, b: dict) -> float:
    return sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a).sqrt().item()


def test_fedprox_strategy_sends_mu_and_client_adds_the_proximal_term():
    cfg = RunConfig(strategy="fedprox", strategy_options={"proximal_mu": 5.0}, num_clients=4)
    strategy = build_strategy(cfg.strategy, cfg.strategy_options, {"min_available_nodes": 4})
    grid = LocalGrid(client_app, num_nodes=4)
    weights = ArrayRecord(build_task("digits").build_model().state_dict())
    (msg, *_) = strategy.configure_train(1, weights, ClientSpec.from_run(cfg).to_record(), grid)
    sent = msg.content["config"]
    assert sent["proximal-mu"] == 5.0
    g0, free = train_once(ConfigRecord({**dict(sent), "proximal-mu": 0.0}))
    g1, prox = train_once(sent)
    assert distance(prox, g1) < 0.7 * distance(free, g0)  # the term pulls towards w_global


def test_client_budget_and_device_metrics():
    cfg = RunConfig(max_train_seconds=0.05, local_epochs=50, num_clients=4)
    task = build_task("digits")
    grid = LocalGrid(client_app, num_nodes=4)
    content = RecordDict(
        {
            "arrays": ArrayRecord(task.build_model().state_dict()),
            "config": ClientSpec.from_run(cfg).to_record(),
        }
    )
    (reply,) = grid.send_and_receive([Message(content, NODE_ID_BASE + 1, MessageType.TRAIN)])
    m = reply.content["metrics"]
    assert m["stopped_early"] == 1 and m["examples_seen"] < 50 * m["num-examples"]
    assert m["train_seconds"] < 5 and m["update_bytes"] > 0 and m["peak_rss_mb"] > 0


def test_a_raising_client_becomes_a_failure_not_a_crash():
    grid = LocalGrid(client_app, num_nodes=2)
    bad = ConfigRecord(
        {**dict(ClientSpec.from_run(RunConfig(num_clients=2)).to_record()), "task": "no-such-task"}
    )
    content = RecordDict({"arrays": ArrayRecord(), "config": bad})
    (reply,) = grid.send_and_receive([Message(content, NODE_ID_BASE, MessageType.TRAIN)])
    assert reply.has_error() and "unknown task" in reply.error.reason


def test_client_started_for_another_task_is_refused():
    grid = LocalGrid(client_app, num_nodes=2)
    grid.context(NODE_ID_BASE).node_config["task"] = "kws"
    content = RecordDict(
        {"arrays": ArrayRecord(), "config": ClientSpec.from_run(RunConfig()).to_record()}
    )
    (reply,) = grid.send_and_receive([Message(content, NODE_ID_BASE, MessageType.TRAIN)])
    assert reply.has_error() and "start the client with the server's --task" in reply.error.reason


def test_flower_compat_layer_self_test():
    from fedge.compat import self_test

    self_test()


def test_lora_clients_ship_only_their_adapters(run_dir, small_run):
    options = {"trainable": "lora", "seq_len": 32}
    cfg = small_run(
        run_dir,
        task="mobilellm",
        task_options=options,
        partition="natural",
        num_clients=10,
        clients_per_round=2,
        rounds=1,
        local_epochs=1,
        eval_fraction=0,
        lr=0.2,
    )
    history = simulate(cfg)
    full = build_task("mobilellm", **options).build_model().state_dict()
    full_bytes = ArrayRecord(full).count_bytes()
    assert 0 < history[0]["update_bytes_mean"] < 0.25 * full_bytes
    final = torch.load(run_dir / "final_model.pt")
    assert set(final) == set(full)  # the server keeps the whole model, frozen base included


def test_nodes_that_never_answer_count_as_failures(run_dir, small_run):
    class LosingGrid(LocalGrid):
        """Drops the reply of the first node, as a real grid does past its timeout."""

        def send_and_receive(self, messages, *, timeout=None):
            return list(super().send_and_receive(messages, timeout=timeout))[1:]

    cfg = small_run(run_dir, rounds=1, eval_fraction=0)
    (record,) = run_server(LosingGrid(client_app, cfg.num_clients), cfg)
    assert record["num_clients"] == 3 and record["failures"] == 1
