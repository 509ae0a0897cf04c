"""RayGrid: the same ClientApp and strategies on a pool of Ray actors."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import plugin_apps  # noqa: F401  (importable by the workers too)
import plugin_strategies
import pytest
import ray
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedge.config import RunConfig
from fedge.processes import fedge_command, free_port, stop, wait_for_port
from fedge.simulation import simulate
from fedge.simulation.local_grid import NODE_ID_BASE
from fedge.simulation.ray_grid import NodeStateStore, RayGrid, init_ray

FEDGE = fedge_command()


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def thousand_clients(out, **kw):
    values = dict(
        backend="ray",
        task_options={"model": "mlp"},
        num_clients=1000,
        clients_per_round=50,
        rounds=2,
        local_epochs=2,
        batch_size=4,
        lr=0.1,
        momentum=0.0,
        eval_fraction=0.1,
        out=str(out),
    )
    return RunConfig.from_mapping({**values, **kw})


def test_thousand_clients_fifty_per_round_learn(run_dir):
    history = simulate(thousand_clients(run_dir))
    assert [r["num_clients"] for r in history] == [50, 50]
    assert history[-1]["accuracy"] > 0.3  # chance is 0.1
    assert history[-1]["loss"] < history[0]["loss"]


def test_custom_strategy_on_ray(run_dir):
    plugin_strategies.CALLS.clear()
    simulate(thousand_clients(run_dir, strategy="plugin_strategies:CountingFedAvg"))
    assert plugin_strategies.CALLS == [1, 2]


def test_dropout_run_completes_and_reports_failures(run_dir):
    history = simulate(thousand_clients(run_dir, dropout_rate=0.3, rounds=3))
    assert len(history) == 3
    assert all(r["num_clients"] + r["failures"] == 50 for r in history)
    assert sum(r["failures"] for r in history) > 10  # about 45 expected
    assert json.loads((run_dir / "history.json").read_text())[-1]["failures"] >= 0


def round_of(grid: RayGrid, nodes: list[int], **config) -> list[Message]:
    content = RecordDict({"config": ConfigRecord(config)})
    msgs = [Message(content, NODE_ID_BASE + n, MessageType.TRAIN) for n in nodes]
    return list(grid.send_and_receive(msgs, timeout=60))


def counts(replies: list[Message]) -> list[int | None]:
    return [None if r.has_error() else r.content["metrics"]["count"] for r in replies]


def test_node_state_persists_spills_and_survives_dead_actors():
    grid = RayGrid(200, app_spec="plugin_apps:counter_app", num_actors=2, state_memory_bytes=5000)
    nodes = list(range(0, 200, 10))
    assert counts(round_of(grid, nodes, **{"state-bytes": 1000})) == [1] * 20
    assert grid.states.spilled > 0  # 20 states of ~1 kB do not fit in 5 kB
    assert counts(round_of(grid, nodes[:5])) == [2] * 5
    for actor in grid.actors:
        ray.kill(actor)
    before = [2] * 5 + [1] * 15
    during = counts(round_of(grid, nodes))
    failed = [i for i, c in enumerate(during) if c is None]
    assert failed  # the calls in flight on the killed actors became error replies
    assert all(c == b + 1 for c, b in zip(during, before, strict=True) if c is not None)
    after = [b + (c is not None) + 1 for b, c in zip(before, during, strict=True)]
    assert counts(round_of(grid, nodes)) == after  # nothing lost, nothing doubled
    grid.shutdown()


def test_raising_clients_and_round_timeout_become_error_replies():
    grid = RayGrid(50, app_spec="plugin_apps:counter_app", num_actors=2, batch_size=1)
    replies = round_of(grid, list(range(10)), **{"raise-on": [3, 4]})
    errors = [i for i, r in enumerate(replies) if r.has_error()]
    assert errors == [3, 4] and "told to fail" in replies[3].error.reason
    content = RecordDict({"config": ConfigRecord({"slow": [7], "sleep": 30.0})})
    msgs = [Message(content, NODE_ID_BASE + n, MessageType.TRAIN) for n in range(10)]
    replies = list(grid.send_and_receive(msgs, timeout=8))
    assert [i for i, r in enumerate(replies) if r.has_error()] == [7]
    assert "round timeout" in replies[7].error.reason
    assert counts(round_of(grid, [7])) == [2]  # the late reply was dropped, not applied
    grid.shutdown()


def test_node_state_store_spills_to_disk(tmp_path):
    store = NodeStateStore(memory_bytes=10, spill_dir=tmp_path)
    for node in range(5):
        store.put(node, bytes([node]) * 6)
    assert store.spilled == 4 and len(list(tmp_path.iterdir())) == 4
    assert [store.get(n) for n in range(5)] == [bytes([n]) * 6 for n in range(5)]
    assert store.get(99) is None


def run_cli(out, *extra):
    cmd = [*FEDGE, "run", "--num-clients", "3", "--rounds", "1", "--eval-fraction", "0"]
    result = subprocess.run(
        cmd + ["--out", str(out), *extra], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return torch.load(out / "final_model.pt")


def test_same_aggregate_as_flowers_run_simulation(tmp_path):
    ours = run_cli(tmp_path / "ray", "--backend", "ray")
    flower = run_cli(tmp_path / "flower", "--backend", "flower")
    for key in ours:
        torch.testing.assert_close(ours[key], flower[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a second Ray (`ray start`) beside the module's: half a minute
def test_joins_a_ray_cluster_started_by_the_test(tmp_path):
    port = free_port()
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block"]
        + ["--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2"]
        + ["--include-dashboard", "false", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=120, proc=head)
        history = run_cli(tmp_path, "--backend", "ray", "--ray-address", f"127.0.0.1:{port}")
        assert history
        records = json.loads((tmp_path / "history.json").read_text())
        assert records[0]["num_clients"] == 3
    finally:
        stop(head, grace=20)
        # `ray start` records its address for later ray.init() calls; do not leave it stale
        marker = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if marker.exists() and marker.read_text().strip().endswith(f":{port}"):
            marker.unlink()
