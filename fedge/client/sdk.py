"""The edge-client SDK: what a device-side app imports.

A device app needs its Task and one call: `join("HOST:PORT", MyTask, data_dir=DIR)` (the
device's own data, in the task's format) or, for experiments, `join("HOST:PORT", MyTask,
partition_id=0, num_partitions=3)` (a simulated share of the task's data). That starts a
Flower SuperNode for this device and, by default, fedge's warm runtime beside it
(`fedge.edge`: one long-lived ClientApp process, no fixed sleeps);
`isolation="subprocess"` keeps Flower's stock SuperNode, one `flwr-clientapp` process per
message. The ClientApp builds the task by name (so the task's module must be importable
here and on the server), trains under the device's time budget and reports device
metrics. `PrivateEmbeddingClient` fetches embedding rows without revealing which.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from fedge.edge.supervisor import default_torch_threads, device_command
from fedge.errors import ConfigError
from fedge.processes import flower_tool, free_port, tool_env
from fedge.wire import (
    NODE_DATA_DIR,
    NODE_MAX_TRAIN_SECONDS,
    NODE_TASK,
    NUM_PARTITIONS,
    PARTITION_ID,
)

if TYPE_CHECKING:  # this module stays light: `fedge client` must not wait for torch
    from fedge.tasks import Task

__all__ = ["join", "supernode_command"]  # and PrivateEmbeddingClient, loaded lazily

ISOLATIONS = ("runtime", "subprocess")  # fedge's warm runtime; Flower's process per message


def task_spec(task: str | type[Task], check: bool = True) -> str:
    """A registered name or `module:Class` for a Task class, checked to resolve here
    (unless `check` is False: fedge's runtime checks it as it starts, torch loaded)."""
    spec = task if isinstance(task, str) else f"{task.__module__}:{task.__qualname__}"
    if check:
        from fedge.tasks import task_class

        task_class(spec)
    return spec


def _toml_value(value: Any) -> str:
    return (
        f"'{value}'"
        if isinstance(value, str)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )


def supernode_command(
    server: str,
    task: str | type[Task],
    partition_id: int | None = None,
    num_partitions: int | None = None,
    max_train_seconds: float = 0.0,
    data_dir: str | None = None,
    tls_dir: str | None = None,
    auth_key: str | None = None,
    isolation: str = "runtime",
    runtime_port: int | None = None,
) -> list[str]:
    """The SuperNode command line for one device, with fedge's node config.

    `tls_dir`: a folder with the federation's `ca.crt` (from `fedge certs`): connect over
    TLS. `auth_key`: this device's enrolled private key (OpenSSH), for servers run with
    `--auth`. `isolation="runtime"`: fedge's SuperNode without fixed sleeps, serving its
    Runtime API on 127.0.0.1:`runtime_port` to fedge's runtime; "subprocess": Flower's stock one.
    """
    if isolation not in ISOLATIONS:
        raise ConfigError(f"--isolation {isolation!r}: expected one of {', '.join(ISOLATIONS)}")
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--server {server!r}: expected HOST:PORT, e.g. 127.0.0.1:9092")
    if (partition_id is None) != (num_partitions is None):
        raise ConfigError("--partition-id and --num-partitions go together")
    if partition_id is None and not data_dir:
        raise ConfigError(
            "give --data-dir DIR (the device's own data) or --partition-id I --num-partitions N"
        )
    if partition_id is not None and num_partitions is not None:
        if not 0 <= partition_id < num_partitions:
            raise ConfigError(
                f"--partition-id {partition_id}: must be in 0..{num_partitions - 1}"
                " (--num-partitions)"
            )
    if data_dir and not os.path.isdir(data_dir):
        raise ConfigError(f"--data-dir {data_dir}: no such folder")
    if max_train_seconds < 0:
        raise ConfigError(f"--max-train-seconds {max_train_seconds}: must be >= 0")
    node_config: dict[str, Any] = {NODE_TASK: task_spec(task, check=isolation == "subprocess")}
    if partition_id is not None:
        node_config.update({PARTITION_ID: partition_id, NUM_PARTITIONS: num_partitions})
    if max_train_seconds:
        node_config[NODE_MAX_TRAIN_SECONDS] = float(max_train_seconds)
    if data_dir:
        node_config[NODE_DATA_DIR] = os.path.abspath(data_dir)
    if tls_dir:
        ca_cert = os.path.join(tls_dir, "ca.crt")
        if not os.path.exists(ca_cert):
            raise ConfigError(f"--tls {tls_dir}: no ca.crt there; copy the server's ca.crt in")
        security = ["--root-certificates", os.path.abspath(ca_cert)]
    elif auth_key:
        raise ConfigError("--auth-key needs --tls DIR: Flower authenticates SuperNodes over TLS")
    else:
        security = ["--insecure"]
    if auth_key:
        if not os.path.exists(auth_key):
            raise ConfigError(f"--auth-key {auth_key}: no such file")
        security += ["--auth-supernode-private-key", os.path.abspath(auth_key)]
    local_port = str(runtime_port or free_port())  # the node's local Runtime API
    if isolation == "runtime":
        head = [sys.executable, "-m", "fedge.edge.supernode"]
        local = ["--isolation", "process", "--host", "127.0.0.1", "--port", local_port]
    else:
        head, local = [flower_tool("flower-supernode")], ["--port", local_port]
    config = " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())
    return [*head, *security, "--superlink", server, *local, "--node-config", config]


def runtime_command(port: int, torch_threads: int, task: str) -> list[str]:
    """fedge's warm runtime for the SuperNode whose Runtime API is on 127.0.0.1:`port`."""
    if torch_threads < 1:
        raise ConfigError(f"--torch-threads {torch_threads}: must be >= 1")
    cmd = [sys.executable, "-m", "fedge.edge.runtime", "--runtime-api", f"127.0.0.1:{port}"]
    return cmd + ["--torch-threads", str(torch_threads), "--task", task]


def seat(partition_id: int | None, num_partitions: int | None, data_dir: str | None) -> str:
    """What this device trains on, in words."""
    if num_partitions is None:
        return f"its own data in {data_dir}"
    return f"partition {partition_id}/{num_partitions}"


def join(
    server: str,
    task: str | type[Task],
    partition_id: int | None = None,
    num_partitions: int | None = None,
    max_train_seconds: float = 0.0,
    data_dir: str | None = None,
    block: bool = True,
    tls_dir: str | None = None,
    auth_key: str | None = None,
    isolation: str = "runtime",
    torch_threads: int | None = None,
) -> Any:
    """Join the federation at `server`. Blocks until stopped (returning the exit status),
    or with `block=False` returns the device's process. `torch_threads`: the runtime's
    torch threads (default: half the cores, at most 4)."""
    port = free_port()
    cmd = supernode_command(
        server,
        task,
        partition_id,
        num_partitions,
        max_train_seconds,
        data_dir,
        tls_dir,
        auth_key,
        isolation,
        port,
    )
    if isolation == "subprocess":
        if not block:
            return subprocess.Popen(cmd, start_new_session=True, env=tool_env())
        print(f"fedge client: {seat(partition_id, num_partitions, data_dir)} joining {server}")
        sys.stdout.flush()
        # the device process becomes the SuperNode, so signals reach it directly
        os.execve(cmd[0], cmd, tool_env())
    spec = task_spec(task, check=False)
    runtime = runtime_command(port, torch_threads or default_torch_threads(), spec)
    ca_cert = os.path.join(tls_dir, "ca.crt") if tls_dir else None
    device = device_command(server, cmd, runtime, ca_cert)
    if not block:
        return subprocess.Popen(device, start_new_session=True, env=tool_env())
    print(f"fedge client: {seat(partition_id, num_partitions, data_dir)} joining {server}")
    sys.stdout.flush()
    # become the light device process (no torch here: the runtime holds it), signals and all
    os.execve(device[0], device, tool_env())


def __getattr__(name: str) -> Any:
    """`PrivateEmbeddingClient` lives in fedge.privacy; loaded on first use."""
    if name == "PrivateEmbeddingClient":
        from fedge.privacy.service import PrivateEmbeddingClient

        return PrivateEmbeddingClient
    raise AttributeError(name)
