"""Helpers of the fault-injection tests: a run's rounds."""

import json
from pathlib import Path


def rounds_of(out) -> list[int]:
    return [r["round"] for r in json.loads((Path(out) / "history.json").read_text())]
