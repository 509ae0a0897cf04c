"""Helpers of the fault-injection tests: the `fedge` command, a run's rounds."""

import json
import sys
from pathlib import Path


def fedge_command(*args: str) -> list[str]:
    """`fedge ARGS` as a command line for this Python."""
    return [sys.executable, "-m", "fedge.cli", *args]


def rounds_of(out) -> list[int]:
    return [r["round"] for r in json.loads((Path(out) / "history.json").read_text())]
