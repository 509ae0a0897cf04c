"""Checks that run before any work: a run that cannot succeed says why before Ray or a
SuperLink starts, and before anything is written into its `--out` folder.

`check_partitions` cuts the task's data as the clients will (every client must get at least
one training sample; `label-k:K` must fit the classes); `prepare_out` refuses to reuse a
folder that holds another run unless told to resume it or to clear it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from fedge.config import RunConfig
from fedge.data.divergence import run_federation
from fedge.data.partition import parse_scheme
from fedge.errors import ConfigError
from fedge.tasks import Task
from fedge.wire import CLIENT_DEFAULTS


def check_partitions(task: Task, cfg: RunConfig) -> None:
    """Every client gets training data under the run's partition scheme; a task that makes
    each client's data (synthetic) has nothing to partition or share."""
    if task.client_data(0) is not None:
        pooled = {
            "partition": cfg.partition not in ("natural", CLIENT_DEFAULTS.partition),
            "shared_fraction": cfg.shared_fraction > 0,
            "track_divergence": cfg.track_divergence,
        }
        for name, needs_pool in pooled.items():
            if needs_pool:
                raise ConfigError(
                    f"{name}: task {cfg.task} makes each client's own data, so there is no "
                    f"pool to partition, share or train centrally; got {getattr(cfg, name)!r}"
                )
        return
    labels = task.train_labels()
    name, arg = parse_scheme(cfg.partition)
    classes = len(np.unique(labels))
    if name == "label-k" and arg > classes:
        raise ConfigError(
            f"partition: label-k:{int(arg)} asks for {int(arg)} classes per client but task "
            f"{cfg.task} has {classes}; use label-k:K with K <= {classes}"
        )
    try:
        fed = run_federation(task, cfg)
    except ValueError as exc:
        raise ConfigError(f"partition: {exc}") from exc
    sizes = np.array([len(part) for part in fed.parts])
    if sizes.min() == 0 and round(len(fed.shared) * cfg.shared_per_client) == 0:
        pid = int(np.argmin(sizes))
        raise ConfigError(
            f"num_clients: client {pid} of {cfg.num_clients} gets no training sample "
            f"({len(labels)} training samples, partition {cfg.partition}); "
            "use fewer clients or another partition"
        )


def prepare_out(cfg: RunConfig) -> Path:
    """The run folder, made ready: resumed as it is, cleared if `overwrite`, else new or
    empty (the run makes it). A folder holding another run is never touched otherwise."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out: {out} is a file; name a folder for the run")
    if cfg.resume:
        if not out.is_dir():
            raise ConfigError(f"resume: {out} does not exist; there is no run to continue")
        return out
    held = sorted(out.iterdir()) if out.is_dir() else []
    if held and not cfg.overwrite:
        raise ConfigError(
            f"out: {out} already holds a run ({len(held)} entries); continue it with "
            f"--resume {out}, clear it with --overwrite, or choose another --out"
        )
    for entry in held:
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return out
