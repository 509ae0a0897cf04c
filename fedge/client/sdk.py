"""The edge-client SDK: what a device-side app imports.

A device app needs its Task and one call: `join("HOST:PORT", MyTask, partition_id=0,
num_partitions=3)`. That starts a Flower SuperNode for this device; for each round the
SuperNode runs fedge's ClientApp, which builds the task by name (so the task's module must
be importable here and on the server), trains under the device's time budget and reports
device metrics. `PrivateEmbeddingClient` fetches embedding rows without revealing which.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from fedge.errors import ConfigError
from fedge.processes import flower_tool, free_port, tool_env
from fedge.tasks import Task, task_class
from fedge.wire import (
    NODE_DATA_DIR,
    NODE_MAX_TRAIN_SECONDS,
    NODE_TASK,
    NUM_PARTITIONS,
    PARTITION_ID,
)

__all__ = ["join", "supernode_command"]  # and PrivateEmbeddingClient, loaded lazily


def task_spec(task: str | type[Task]) -> str:
    """A registered name or `module:Class` for a Task class, checked to resolve here."""
    spec = task if isinstance(task, str) else f"{task.__module__}:{task.__qualname__}"
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
    partition_id: int,
    num_partitions: int,
    max_train_seconds: float = 0.0,
    data_dir: str | None = None,
    tls_dir: str | None = None,
    auth_key: str | None = None,
) -> list[str]:
    """The `flower-supernode` command line for one device, with fedge's node config.

    `tls_dir`: a folder with the federation's `ca.crt` (from `fedge certs`): connect over
    TLS. `auth_key`: this device's enrolled private key (OpenSSH), for servers run with
    `--auth`.
    """
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--server {server!r}: expected HOST:PORT, e.g. 127.0.0.1:9092")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"--partition-id {partition_id}: must be in 0..{num_partitions - 1} (--num-partitions)"
        )
    if max_train_seconds < 0:
        raise ConfigError(f"--max-train-seconds {max_train_seconds}: must be >= 0")
    node_config: dict[str, Any] = {
        PARTITION_ID: partition_id,
        NUM_PARTITIONS: num_partitions,
        NODE_TASK: task_spec(task),
    }
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
    return [
        flower_tool("flower-supernode"),
        *security,
        "--superlink",
        server,
        "--port",
        str(free_port()),  # the node's local ClientApp API; one per device process
        "--node-config",
        " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items()),
    ]


def join(
    server: str,
    task: str | type[Task],
    partition_id: int,
    num_partitions: int,
    max_train_seconds: float = 0.0,
    data_dir: str | None = None,
    block: bool = True,
    tls_dir: str | None = None,
    auth_key: str | None = None,
) -> Any:
    """Join the federation at `server`. Blocks until stopped, or returns the process."""
    cmd = supernode_command(
        server, task, partition_id, num_partitions, max_train_seconds, data_dir, tls_dir, auth_key
    )
    if not block:
        return subprocess.Popen(cmd, start_new_session=True, env=tool_env())
    print(f"fedge client: partition {partition_id}/{num_partitions} joining {server}", flush=True)
    # the device process becomes the SuperNode, so signals reach it directly
    os.execve(cmd[0], cmd, tool_env())


def __getattr__(name: str) -> Any:
    """`PrivateEmbeddingClient` lives in fedge.privacy; loaded on first use."""
    if name == "PrivateEmbeddingClient":
        from fedge.privacy.service import PrivateEmbeddingClient

        return PrivateEmbeddingClient
    raise AttributeError(name)
