"""Fault: `fedge run` (Ray engine) and `fedge server` killed with SIGKILL leave no process
behind: every process they started, Ray's agents and Flower's SuperExec and ServerApp
included, is gone within 5 s. Found by an environment variable only this test sets, which
every descendant inherits. Real processes on 127.0.0.1."""

import os
import signal
import subprocess
import time
import uuid

import pytest
from faultkit import wait_until

from fedge.processes import fedge_command, free_port, is_zombie, tagged

MARK = "FEDGE_TEST_TREE"


def marked(token: str) -> list[str]:
    """Command lines of the live (not zombie) processes that carry this test's mark."""
    found = []
    for pid in tagged(token, variable=MARK):
        if is_zombie(pid):
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode()
            found.append(f"{pid}: {cmdline[:120]}")
        except OSError:
            continue
    return found


def kill_9_and_list(args: list[str], ready: str, log_path, timeout: float) -> list[str]:
    token = uuid.uuid4().hex
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            fedge_command(*args),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, MARK: token},
        )
    try:
        wait_until(lambda: ready in log_path.read_text(), timeout, ready, proc=proc)
        assert len(marked(token)) > 1, "the command started no children to check"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while marked(token) and time.monotonic() < deadline:
            time.sleep(0.2)
        return marked(token)
    finally:
        for pid in tagged(token, variable=MARK):  # never leave one behind for the next test
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.slow
def test_kill_9_of_fedge_run_on_ray_leaves_no_process(tmp_path):
    args = ["run", "--task", "digits", "--num-clients", "4", "--rounds", "50", "--backend", "ray"]
    args += ["--task-option", "model=mlp", "--out", str(tmp_path / "run")]
    left = kill_9_and_list(args, "round 1/", tmp_path / "log", timeout=600)
    assert not left, "\n".join(left)


@pytest.mark.slow
def test_kill_9_of_fedge_server_leaves_no_process(tmp_path):
    port = free_port()
    args = ["server", "--task", "digits", "--num-clients", "2", "--rounds", "3"]
    args += ["--port", str(port), "--out", str(tmp_path / "run")]
    left = kill_9_and_list(args, "waiting for clients", tmp_path / "log", timeout=300)
    assert not left, "\n".join(left)
