"""Starting, watching and stopping the Flower processes fedge runs for the user."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def flower_tool(name: str) -> str:
    """Path of a Flower console script installed beside this Python (e.g. flower-superlink)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"{name} not found; install fedge (it brings flwr) into this Python"
        )
    return found


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with this Python's scripts first on PATH: Flower's processes start
    more of Flower's scripts (flower-superexec, flwr-clientapp) by name."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, **(extra or {})}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(
    host: str, port: int, timeout: float, proc: subprocess.Popen | None = None
) -> None:
    """Block until something accepts connections on host:port (or the process dies)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL when its parent dies, even by `kill -9`, so a killed
    `fedge server` leaves no SuperLink holding its port (PR_SET_PDEATHSIG = 1)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def start(
    cmd: list[str],
    log: Path | None = None,
    env: dict[str, str] | None = None,
    output: int | None = subprocess.DEVNULL,
) -> subprocess.Popen:
    """Start a child in its own process group (so stop() also ends its children); its
    output goes to `log`, else to `output` (None: this process's stdout; PIPE: a pipe)."""
    out = open(log, "ab") if log else output  # the child owns it: closed when it exits
    return subprocess.Popen(
        cmd,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=tool_env(env),
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left after `grace` s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their parent
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
