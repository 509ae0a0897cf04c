"""The README's examples run as written."""

import re
import sys
import types
from pathlib import Path

from fedge.config import RunConfig
from fedge.simulation import simulate

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return next(b for b in blocks if containing in b)


def test_readme_task_example_trains_in_a_federation(run_dir):
    module = types.ModuleType("readme_blobs")
    exec(compile(python_block("class Blobs"), "README.md", "exec"), module.__dict__)
    sys.modules["readme_blobs"] = module
    try:
        history = simulate(
            # in-process: the module exists only in this interpreter
            RunConfig(
                task="readme_blobs:Blobs",
                num_clients=3,
                rounds=2,
                backend="local",
                out=str(run_dir),
            )
        )
    finally:
        del sys.modules["readme_blobs"]
    assert history[-1]["accuracy"] > 0.9  # three well-separated blobs; chance is 1/3
