"""One device: a Flower SuperNode (`--isolation process`) plus fedge's warm runtime.

`run_device` is what `fedge client` runs: it checks that the server answers (saying why not,
retrying with a growing, printed backoff), starts the SuperNode (`fedge.edge.supernode`)
and the runtime (`fedge.edge.runtime`), starts a new runtime whenever one dies, and stops
both when it is stopped (SIGTERM, Ctrl-C) or when the SuperNode exits (then with its
status). Both children die with it even on `kill -9` (see `fedge.processes.start`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from fedge.processes import start, stop

REFUSED = "Failed to activate SuperNode"  # what Flower's SuperNode says when refused
FATAL = 2  # a runtime exiting with this status cannot work (say, an unknown task): no restart


def default_torch_threads() -> int:
    """Half the cores, at most 4, at least 1: devices sharing a machine do not fight."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def say(text: str) -> None:
    print(f"fedge client: {text}", flush=True)


def probe(server: str, ca_cert: str | None, timeout: float = 3.0) -> str | None:
    """Why a client cannot talk to `server` (HOST:PORT) the way it was told to, or None."""
    host, _, port = server.rpartition(":")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as exc:
        return f"nothing answers there ({exc.strerror or exc})"
    with sock:
        if ca_cert:
            context = ssl.create_default_context(cafile=ca_cert)
            try:
                with context.wrap_socket(sock, server_hostname=host):
                    return None
            except ssl.SSLError as exc:
                return f"TLS handshake failed ({exc.reason}); does the server run with --tls?"
            except OSError as exc:
                return f"TLS handshake failed ({exc})"
        try:
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            answer = sock.recv(5)
        except OSError as exc:
            return f"the server closed the connection ({exc})"
        if not answer.startswith(b"HTTP/"):
            return "the server speaks TLS; start the client with --tls DIR (its ca.crt)"
    return None


def wait_for_server(server: str, ca_cert: str | None, stopping: threading.Event) -> bool:
    """Probe until the server answers as expected; False if stopped meanwhile."""
    delay = 1.0
    while (reason := probe(server, ca_cert)) is not None:
        say(f"cannot join {server}: {reason}; retrying in {delay:.0f} s")
        if stopping.wait(delay):
            return False
        delay = min(30.0, delay * 2)
    return True


def watch_supernode(proc: subprocess.Popen) -> None:
    """Echo the SuperNode's output; name the cause when the server refuses this device."""
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace")
        sys.stdout.write(line)
        sys.stdout.flush()
        if REFUSED in line:
            say("the server refused this device's key: it is not enrolled there")


def run_device(
    server: str,
    supernode_cmd: list[str],
    runtime_cmd: list[str],
    ca_cert: str | None = None,
) -> int:
    """Run the device until stopped; the SuperNode's exit status, 0 if stopped by a signal."""
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if not wait_for_server(server, ca_cert, stopping):
        return 0
    state_dir = tempfile.mkdtemp(prefix="fedge-runtime-")
    runtime_cmd = [*runtime_cmd, "--state-dir", state_dir]
    supernode = start(supernode_cmd, output=subprocess.PIPE)
    threading.Thread(target=watch_supernode, args=(supernode,), daemon=True).start()
    runtime = start(runtime_cmd, output=None)
    say(f"joined {server}: SuperNode pid {supernode.pid}, runtime pid {runtime.pid}")
    try:
        while not stopping.wait(0.2):
            if supernode.poll() is not None:
                say(f"the SuperNode exited with status {supernode.returncode}")
                return supernode.returncode
            if runtime.poll() == FATAL:
                say("the runtime cannot start (see above); stopping")
                return FATAL
            if runtime.poll() is not None:
                say(f"the runtime (pid {runtime.pid}) exited with status {runtime.returncode};")
                runtime = start(runtime_cmd, output=None)
                say(f"  started a new one (pid {runtime.pid})")
        return 0
    finally:
        stop(runtime, grace=5)
        stop(supernode, grace=5)
        for leftover in Path(state_dir).iterdir():
            leftover.unlink()
        Path(state_dir).rmdir()


def device_command(
    server: str, supernode_cmd: list[str], runtime_cmd: list[str], ca_cert: str | None
) -> list[str]:
    """The command line of a device process that runs `run_device` with these arguments."""
    spec = {"server": server, "supernode": supernode_cmd, "runtime": runtime_cmd, "ca": ca_cert}
    return [sys.executable, "-m", "fedge.edge.supervisor", json.dumps(spec)]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fedge.edge.supervisor SPEC_JSON` (see `device_command`)."""
    spec = json.loads((argv or sys.argv[1:])[0])
    return run_device(spec["server"], spec["supernode"], spec["runtime"], spec["ca"])


if __name__ == "__main__":
    sys.exit(main())
