"""Starting, watching and stopping child processes: the Flower processes fedge runs for the
user, `fedge` commands run by this Python, servers that announce themselves on stdout
(`ReadyProcess`, e.g. two `fedge pir-server` parties: `PIRServerProcess`), and a reaper
that kills what a killed command leaves behind (`reap_tree_on_exit`)."""

from __future__ import annotations

import ctypes
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO


def fedge_command(*args: str) -> list[str]:
    """`fedge ARGS` as a command line for this Python (`python -m fedge.cli`): a child runs the
    fedge this process imports, whichever `fedge` script is first on PATH."""
    return [sys.executable, "-m", "fedge.cli", *args]


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


def check_port_free(host: str, port: int) -> None:
    """Raise OSError naming the port if something already listens on host:port (a second
    server would otherwise fail in its log while clients reach the first)."""
    with socket.socket() as s:
        # as servers bind: connections a killed server left in TIME_WAIT do not count
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise OSError(
                f"port {port} on {host} is in use ({exc.strerror}); stop what listens there "
                "or choose another --port"
            ) from None


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


def die_with_parent() -> None:
    """Linux: the child gets SIGKILL when its parent dies, even by `kill -9`, so a killed
    `fedge server` leaves no SuperLink holding its port (PR_SET_PDEATHSIG = 1)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


TREE_ENV = "FEDGE_PROCESS_TREE"  # the token every process of one fedge command carries
_reaped_pid: int | None = None  # the process that started its reaper (a fork inherits this)


def reap_tree_on_exit() -> None:
    """Tag every process this one starts from now on, and start a reaper that kills the
    tagged ones once this process is gone, however it ended (kill -9 included). Ray's agents
    (DashboardAgent, RuntimeEnvAgent) and Flower's SuperExec/ServerApp do not die with their
    parent; they inherit the tag through their environment, as every descendant does.
    A process needs one reaper, however many commands it runs (tests call `main` often)."""
    global _reaped_pid
    if _reaped_pid == os.getpid():
        return
    _reaped_pid = os.getpid()
    token = uuid.uuid4().hex
    os.environ[TREE_ENV] = token
    subprocess.Popen(
        [sys.executable, "-m", "fedge.processes", "reap", str(os.getpid()), token],
        start_new_session=True,  # not in the group a Ctrl-C or a test's killpg reaches
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def tagged(token: str, variable: str = TREE_ENV) -> list[int]:
    """Processes (but this one) whose environment sets `variable` to `token`."""
    mark, found = f"{variable}={token}".encode(), []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if mark in f.read().split(b"\0"):
                        found.append(int(name))
            except OSError:  # gone, or not ours to read
                continue
    return found


def reap(pid: int, token: str) -> None:
    """Wait until `pid` has exited, then SIGKILL every process tagged with `token`."""
    try:
        fd = os.pidfd_open(pid)
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        sel.select()  # readable once the process has exited
    except OSError:  # already gone, or no pidfd: poll
        while os.path.exists(f"/proc/{pid}") and not is_zombie(pid):
            time.sleep(0.2)
    for _ in range(3):  # a dying parent may still be starting one
        for child in tagged(token):
            try:
                os.kill(child, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.2)


def is_zombie(pid: int) -> bool:
    """Whether `pid` has exited and waits for its parent to reap it (it still has a pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return False


def start(
    cmd: list[str],
    log: Path | None = None,
    env: dict[str, str] | None = None,
    output: int | None = subprocess.DEVNULL,
) -> subprocess.Popen:
    """Start a child in its own process group (so stop() also ends its children); its
    output goes to `log`, else to `output` (None: this process's stdout; PIPE: a pipe)."""
    with ExitStack() as stack:  # the child keeps its own copy of the log file
        out: IO[bytes] | int | None = stack.enter_context(open(log, "ab")) if log else output
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=tool_env(env),
            start_new_session=True,
            preexec_fn=die_with_parent,
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


class ReadyProcess:
    """A child that says it is ready with one line on stdout (a server's "listening on ...").
    Its stderr goes to a temporary file, so a chatty child never blocks on a full pipe and a
    failed start can say why; `stop` signals the child's own PID only."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None):
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._err, text=True, env=env
        )

    def ready_line(self, prefix: str, timeout: float = 120.0) -> str:
        """The rest of the child's first line, which must start with `prefix`; otherwise the
        child is stopped and RuntimeError carries that line and its error output."""
        assert self.proc.stdout is not None  # Popen(stdout=PIPE)
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            line = self.proc.stdout.readline() if sel.select(timeout) else ""
        if line.startswith(prefix):
            return line[len(prefix) :]
        self._end(10.0)  # before reading its error output, which stop() then closes
        self._err.seek(0)
        why = self._err.read().decode(errors="replace").strip()
        self.stop()
        raise RuntimeError(f"{line.strip()} {why or f'no answer within {timeout:g} s'}".strip())

    def _end(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL after `timeout` s; the files stay open."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM to the child's PID (SIGKILL if it lingers past `timeout`); its exit status."""
        self._end(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()
        return self.proc.returncode


class PIRServerProcess(ReadyProcess):
    """One PIR party as a real `fedge pir-server` process on a free port of `host`."""

    def __init__(self, table_path: str | Path, party: int, host: str = "127.0.0.1"):
        self.party = party
        cmd = fedge_command("pir-server", "--table", str(table_path), "--party", str(party))
        super().__init__([*cmd, "--host", host, "--port", "0"])

    def address(self, timeout: float = 120.0) -> str:
        """HOST:PORT once the server listens (it prints `pir-server party P listening on
        HOST:PORT ...`); RuntimeError with its output if it does not start."""
        try:
            rest = self.ready_line(f"pir-server party {self.party} listening on ", timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"pir-server party {self.party} did not start: {exc}") from None
        return rest.split()[0]


@contextmanager
def pir_server_processes(table_path: str | Path, host: str = "127.0.0.1") -> Iterator[list[str]]:
    """Both parties as real `fedge pir-server` processes serving one .npy table (started
    together, stopped on exit from the block); yields their addresses [party 0, party 1]."""
    with ExitStack() as stack:
        servers = []
        for party in (0, 1):
            servers.append(PIRServerProcess(table_path, party, host))
            stack.callback(servers[-1].stop)
        yield [server.address() for server in servers]


if __name__ == "__main__" and sys.argv[1:2] == ["reap"]:
    reap(int(sys.argv[2]), sys.argv[3])
