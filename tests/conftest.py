"""Shared fixtures: torch on the two cores CI has, a run folder, and a small federated run."""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedge.config import RunConfig

torch.set_num_threads(2)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a whole test module (`pytestmark = pytest.mark.usefixtures(
    "one_thread")`): on 2 shared cores it is several times faster than two for the small
    models the task tests train."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_small_run(out: Path | str, **kw: Any) -> RunConfig:
    """Digits on the in-process grid: an MLP, 4 clients, 2 rounds of one local epoch, no
    federated evaluation; `kw` overrides any field."""
    base = dict(
        backend="local",
        num_clients=4,
        rounds=2,
        local_epochs=1,
        eval_fraction=0,
        task_options={"model": "mlp"},
        out=str(out),
    )
    return RunConfig.from_mapping({**base, **kw})


@pytest.fixture(scope="session")
def small_run() -> Callable[..., RunConfig]:
    """`small_run(out, **fields)`: a quick digits run for tests that need a whole federated
    run but not a good model."""
    return make_small_run


def make_tiny_decoder(seed: int = 0, **changes: Any) -> Any:
    """A small random MobileLLM decoder in eval mode (vocab 40, 6 layers of width 32, block
    128); `changes` override ModelConfig fields."""
    from fedge.tasks.mobilellm.model import ModelConfig, Transformer

    base = dict(vocab_size=40, n_layer=6, dim=32, n_head=4, n_kv_head=2, ffn_dim=48)
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**base, "block_size": 128, **changes})).eval()


@pytest.fixture(scope="session")
def tiny_decoder() -> Callable[..., Any]:
    """`tiny_decoder(seed, **config changes)`: a fresh small decoder for LayerSkip tests."""
    return make_tiny_decoder


def run_deployed(server_flags: list[str], clients: int, tmp_path: Path) -> list[dict]:
    """`fedge server FLAGS` on a free loopback port with `clients` `fedge client` processes
    (simulated shares); waits for the run, stops every process, returns its history (none
    for a Flower App, which keeps its own results)."""
    import json
    import subprocess

    from fedge.processes import fedge_command, free_port, stop

    fedge, port, out = fedge_command(), free_port(), tmp_path / "run"
    server = subprocess.Popen(
        [*fedge, "server", *server_flags, "--min-clients", str(clients)]
        + ["--port", str(port), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    devices = [
        subprocess.Popen(
            [*fedge, "client", "--server", f"127.0.0.1:{port}", "--partition-id", str(i)]
            + ["--num-partitions", str(clients)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for i in range(clients)
    ]
    try:
        output, _ = server.communicate(timeout=840)
        assert server.returncode == 0, output[-3000:]
    finally:
        for proc in [server, *devices]:
            stop(proc, grace=5)
    assert all(p.poll() is not None for p in [server, *devices])
    history = out / "history.json"
    return json.loads(history.read_text()) if history.exists() else []


@pytest.fixture
def deployed(tmp_path: Path) -> Callable[[list[str], int], list[dict]]:
    """`deployed(server_flags, clients)`: the history of a real deployed run (`run_deployed`)."""
    return lambda flags, clients: run_deployed(flags, clients, tmp_path)
