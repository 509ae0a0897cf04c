"""Fault: a deployed `fedge server` (TLS + SuperNode auth) is killed with SIGKILL mid-run.
`fedge server --resume` restarts the SuperLink from its database, on the port and with the
TLS and auth settings of the killed run; the same client processes carry on, and the
history holds every round exactly once. Real processes on 127.0.0.1."""

import os
import signal
import time

import pytest
from faultkit import rounds_of

from fedge.processes import free_port
from fedge.server.certs import make_certs


@pytest.mark.slow
def test_kill_9_deployed_server_then_resume(tmp_path, launch):
    tls = make_certs(tmp_path / "tls", clients=2)
    port, out, logs = free_port(), tmp_path / "run", launch.logs
    secure = ["--tls", str(tls), "--auth", "--port", str(port)]

    flags = ["--num-clients", "2", "--rounds", "3", "--local-epochs", "1", "--eval-fraction", "0"]
    flags += ["--task-option", "model=mlp", "--round-timeout", "300", "--out", str(out)]
    server = launch("server1", "server", *secure, *flags)
    while "enrolled 2 client keys" not in (logs / "server1").read_text():
        assert server.poll() is None, (logs / "server1").read_text()
        time.sleep(0.5)
    clients = [
        launch(
            f"client{i}",
            "client",
            *["--server", f"127.0.0.1:{port}", "--partition-id", str(i), "--num-partitions", "2"],
            *["--tls", str(tls), "--auth-key", str(tls / "clients" / f"client_{i}")],
        )
        for i in (0, 1)
    ]
    deadline = time.monotonic() + 600
    while not (out / "history.json").exists():
        assert server.poll() is None and time.monotonic() < deadline
        time.sleep(0.5)
    os.kill(server.pid, signal.SIGKILL)
    server.wait()
    assert rounds_of(out) and rounds_of(out)[-1] < 3

    server_log = (out / "server.log").read_text()
    resumed = launch("server2", "server", "--resume", str(out))  # port, TLS, auth: as before
    assert resumed.wait(timeout=900) == 0, (logs / "server2").read_text()[-2000:]
    assert (out / "server.log").read_text().startswith(server_log)  # appended to, not replaced
    assert rounds_of(out) == [1, 2, 3]
    assert "resuming" in (logs / "server2").read_text()
    assert all(c.poll() is None for c in clients)  # the devices never had to restart
    for i in (0, 1):  # the resumed run is a new run: each runtime reloaded, in the same pid
        log = (logs / f"client{i}").read_text()
        assert "starts; reloading" in log and "exited with status" not in log, log[-3000:]
