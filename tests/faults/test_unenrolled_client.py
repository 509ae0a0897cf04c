"""Fault: a client whose key is not enrolled tries to join a TLS + SuperNode-auth server.
It is refused, and both sides say why; the enrolled clients finish the run. Real processes
on 127.0.0.1."""

import subprocess
import time

from faultkit import rounds_of

from fedge.processes import free_port
from fedge.server.certs import client_key, make_certs


def test_unenrolled_client_is_refused_while_the_run_goes_on(tmp_path, launch):
    tls = make_certs(tmp_path / "tls", clients=2)
    intruder = client_key(tmp_path / "intruder")  # a valid key pair, but never enrolled
    port, out = free_port(), tmp_path / "run"
    server_flags = ["--tls", str(tls), "--auth", "--port", str(port), "--out", str(out)]
    server_flags += ["--num-clients", "2", "--rounds", "2", "--local-epochs", "1"]
    server_flags += ["--eval-fraction", "0", "--task-option", "model=mlp", "--round-timeout", "300"]
    logs = launch.logs

    server = launch("server", "server", *server_flags)
    deadline = time.monotonic() + 120
    while "enrolled 2 client keys" not in (logs / "server").read_text():
        assert server.poll() is None and time.monotonic() < deadline, (logs / "server").read_text()
        time.sleep(0.5)

    def client(name: str, partition: int, key) -> subprocess.Popen:
        flags = ["--server", f"127.0.0.1:{port}", "--partition-id", str(partition)]
        flags += ["--num-partitions", "2", "--tls", str(tls), "--auth-key", str(key)]
        return launch(name, "client", *flags)

    stranger = client("stranger", 1, intruder)
    members = [client(f"member{i}", i, tls / "clients" / f"client_{i}") for i in (0, 1)]
    assert stranger.wait(timeout=300) != 0
    assert "Failed to activate SuperNode" in (logs / "stranger").read_text()
    assert "refused this device's key: it is not enrolled" in (logs / "stranger").read_text()

    deadline = time.monotonic() + 600
    while server.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    assert server.wait() == 0
    assert "refused a device whose key is not enrolled" in (logs / "server").read_text()
    assert rounds_of(out) == [1, 2]
    assert all(proc.poll() is None for proc in members)  # still connected, never disturbed
