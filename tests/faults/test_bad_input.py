"""Bad input: every check that can run before any work does, and nothing in `--out` is lost.

Each case starts from a finished run and checks every file of it, byte for byte, after the
bad command; a run whose clients all fail stops with its history intact; the same seed
gives the same history.
"""

import hashlib

import pytest

from fedge.cli import main
from fedge.errors import ConfigError
from fedge.simulation import simulate


def timing(key: str) -> bool:
    """Record keys that measure the machine (time, memory, who was slowest), not the run."""
    return "seconds" in key or key in ("peak_rss_mb_max", "slowest_node")


def checksums(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, small_run):
    """A finished 2-round run, and the checksums of every file in it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    simulate(small_run(out))
    return out, checksums(out)


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--strategy", "fedavgg"], "unknown strategy 'fedavgg'"),
        (["--num-clients", "5000"], "cannot split 4000 samples into 5000 partitions"),
        (["--partition", "label-k:11"], "label-k:11 asks for 11 classes per client but task"),
        (["--task-option", "model=transformer"], "task digits:"),
        ([], "already holds a run"),  # reused without --resume or --overwrite
    ],
)
def test_a_bad_run_on_a_finished_folder_changes_nothing(finished, capsys, flags, says):
    out, before = finished
    args = ["run", "--backend", "local", "--task-option", "model=mlp", *flags, "--out", str(out)]
    code = main(args)
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
    assert checksums(out) == before


def test_overwrite_clears_the_folder_first(tmp_path, small_run):
    out = tmp_path / "run"
    simulate(small_run(out, rounds=3))
    assert (out / "checkpoints" / "round_003.pt").exists()
    history = simulate(small_run(out, rounds=1, overwrite=True))
    assert len(history) == 1
    assert not (out / "checkpoints" / "round_003.pt").exists()  # no stale checkpoint beside it


def test_out_naming_a_file_is_refused(tmp_path, small_run):
    path = tmp_path / "afile"
    path.write_text("not a run")
    with pytest.raises(ConfigError, match="is a file"):
        simulate(small_run(path))
    assert path.read_text() == "not a run"


def test_a_run_whose_clients_all_fail_stops_with_its_history_intact(tmp_path, small_run, capsys):
    out = tmp_path / "run"
    history = simulate(small_run(out, rounds=6, faults="crash:1.0", max_failed_rounds=2))
    assert [r["round"] for r in history] == [1, 2]  # stopped after two rounds in a row
    assert all(r["num_clients"] == 0 and r["failures"] == 4 for r in history)
    assert all("simulated client crash" in r["failure_reasons"][0] for r in history)
    assert "2 rounds in a row aggregated no update" in capsys.readouterr().out
    assert (out / "final_model.pt").exists() and (out / "history.json").exists()


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_the_same_seed_gives_the_same_history(tmp_path, small_run, backend):
    from fedge.simulation.ray_grid import ray

    def run(name, seed):
        cfg = small_run(
            tmp_path / name,
            backend=backend,
            client_cpus=0.5,
            num_clients=20,
            clients_per_round=5,
            partition="dirichlet:0.3",
            seed=seed,
        )
        return [{k: v for k, v in r.items() if not timing(k)} for r in simulate(cfg)]

    try:
        first, second = run("a", 3), run("b", 3)
        if backend == "local":  # another seed, another run (the seed is not the backend's)
            assert run("c", 4)[0]["examples_seen"] != first[0]["examples_seen"]
        if backend == "ray":  # fedge's own Ray listens on loopback only (no authentication)
            assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
            with pytest.raises(ConfigError, match="client_gpus: each client asks for 1000"):
                simulate(small_run(tmp_path / "gpus", backend="ray", client_gpus=1000))
    finally:
        ray.shutdown()
    assert first == second


def test_a_client_without_evaluation_data_fails_its_evaluation_not_the_round():
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    from fedge.client.app import app as client_app
    from fedge.simulation.local_grid import NODE_ID_BASE, LocalGrid
    from fedge.tasks import build_task
    from fedge.wire import ARRAYS, CONFIG

    grid = LocalGrid(client_app, num_nodes=4000)  # 4,000 images: one sample a client
    model = build_task("digits").build_model()
    content = RecordDict({ARRAYS: ArrayRecord(model.state_dict()), CONFIG: ConfigRecord()})
    (reply,) = grid.send_and_receive([Message(content, NODE_ID_BASE, MessageType.EVALUATE)])
    assert reply.has_error() and "holds no evaluation data" in reply.error.reason


def test_a_busy_port_is_an_error_before_anything_starts(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = tmp_path / "run"
        assert main(["server", "--port", str(port), "--out", str(out)]) == 2
    assert f"port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
    assert not out.exists()
