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
