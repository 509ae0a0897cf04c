"""Helpers of the fault-injection tests: small digits runs, the `fedge` command."""

import json
import sys
from pathlib import Path

from fedge.config import RunConfig


def small_run(out, **kw) -> RunConfig:
    """A quick digits run: an MLP, one local epoch, no federated evaluation."""
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


def fedge_command(*args: str) -> list[str]:
    """`fedge ARGS` as a command line for this Python."""
    return [sys.executable, "-m", "fedge.cli", *args]


def rounds_of(out) -> list[int]:
    return [r["round"] for r in json.loads((Path(out) / "history.json").read_text())]
