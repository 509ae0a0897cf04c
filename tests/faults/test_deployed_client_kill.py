"""Fault: a deployed client process (a SuperNode) is killed with SIGKILL mid-run. The round
it was in ends at the timeout with a failure; later rounds go on with the clients still
connected. Real processes on 127.0.0.1."""

import json
import os
import signal
import time

import pytest
from faultkit import rounds_of

from fedge.processes import free_port


@pytest.mark.slow
def test_killed_device_does_not_stop_the_run(tmp_path, launch):
    port, out, logs = free_port(), tmp_path / "run", launch.logs

    flags = ["--num-clients", "3", "--rounds", "3", "--local-epochs", "1", "--eval-fraction", "0"]
    flags += ["--task-option", "model=mlp", "--round-timeout", "90", "--port", str(port)]
    server = launch("server", "server", *flags, "--out", str(out))
    clients = [
        launch(
            f"client{i}",
            "client",
            *["--server", f"127.0.0.1:{port}", "--partition-id", str(i), "--num-partitions", "3"],
        )
        for i in range(3)
    ]
    deadline = time.monotonic() + 600
    while not (out / "history.json").exists():
        assert server.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    os.kill(clients[2].pid, signal.SIGKILL)  # the device dies between or during rounds

    assert server.wait(timeout=900) == 0, (logs / "server").read_text()[-2000:]
    assert rounds_of(out) == [1, 2, 3]
    history = json.loads((out / "history.json").read_text())
    assert history[0]["num_clients"] == 3
    after = history[1:]
    # the dead device either failed its round (timeout) or was no longer sampled
    assert any(r["failures"] >= 1 or r["num_clients"] == 2 for r in after)
    assert all(r["num_clients"] >= 2 for r in after)
