"""Fixtures of the fault-injection tests."""

import subprocess

import pytest


@pytest.fixture
def processes():
    """Processes a test starts; every one is killed at the end, whatever happened."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
