"""Fixtures of the fault-injection tests."""

import subprocess

import pytest

from fedge.processes import fedge_command


@pytest.fixture
def processes():
    """Processes a test starts; every one is killed at the end, whatever happened."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def launch(tmp_path, processes):
    """`launch(name, *args)` starts `fedge ARGS` with its output in `launch.logs / name`
    (files, not pipes: nothing blocks on a full pipe); it is killed at the end."""
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, *args: str) -> subprocess.Popen:
        with open(logs / name, "wb") as log:
            proc = subprocess.Popen(fedge_command(*args), stdout=log, stderr=subprocess.STDOUT)
        processes.append(proc)
        return proc

    start.logs = logs
    return start
