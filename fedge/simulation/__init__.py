"""The simulation engines: `simulate(cfg)` runs a whole federation in this process tree.

`LocalGrid` (fedge.simulation.local_grid) calls the ClientApp in-process; `RayGrid`
(fedge.simulation.ray_grid) serves it from a pool of Ray actors; `backend = "flower"` uses
Flower's own `run_simulation`. All run the same ServerApp (`fedge.server.app.run_server`)
and ClientApp (`fedge.client.app.app`). With `devices` set, fedge's engines run on the
virtual clock of a device population (`fedge.simulation.clock`, `fedge.simulation.devices`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from flwr.app import UserConfig
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedge.config import RunConfig
from fedge.server.app import build_server_app, prepare, run_server
from fedge.server.history import load_history
from fedge.server.preflight import prepare_out
from fedge.simulation.clock import load_population, with_clock
from fedge.simulation.local_grid import LocalGrid, VirtualGrid

__all__ = ["engine", "simulate"]


def simulate(cfg: RunConfig) -> list[dict[str, Any]]:
    """Run a whole federated simulation in this process tree and return its history.

    Every check that can run before any work runs first (`prepare`, `prepare_out`): a bad
    config, task, strategy, partition or `out` folder fails before an engine starts. With
    `cfg.app`, the Flower App in that folder runs instead (`fedge.simulation.flower_app`).
    """
    if cfg.app:
        from fedge.simulation.flower_app import run_app

        return run_app(cfg)
    from fedge.client.app import app as client_app

    prepared = prepare(cfg)
    devices = load_population(cfg, prepared.task) if cfg.devices else None
    prepare_out(cfg)
    _quiet_flower()

    def on_clock(grid: VirtualGrid) -> Grid:
        return with_clock(grid, cfg, devices) if devices is not None else grid

    if cfg.backend in ("ray", "local"):
        with engine(cfg, client_app) as grid:
            return run_server(on_clock(grid), cfg, prepared)
    if cfg.backend == "flower":
        from flwr.simulation import run_simulation

        run_simulation(
            server_app=build_server_app(cfg),
            client_app=client_app,
            num_supernodes=cfg.num_clients,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
        return load_history(cfg.out)
    raise ValueError(f"backend {cfg.backend!r} is not known")


@contextlib.contextmanager
def engine(
    cfg: RunConfig,
    client_app: ClientApp,
    app_spec: str | None = None,
    app_dir: str | None = None,
    run_config: UserConfig | None = None,
) -> Iterator[VirtualGrid]:
    """fedge's engine for `cfg.backend` (ray or local) serving `client_app` to
    `cfg.num_clients` virtual nodes whose Contexts carry `run_config`. Ray's actors import
    it as `app_spec` (fedge's ClientApp by default), from `app_dir` first; they stop
    afterwards."""
    if cfg.backend == "local":
        yield LocalGrid(client_app, cfg.num_clients, run_config=run_config)
        return
    from fedge.simulation.ray_grid import DEFAULT_CLIENT_APP, RayGrid, init_ray

    init_ray(cfg.ray_address)
    grid = RayGrid(
        cfg.num_clients,
        app_spec=app_spec or DEFAULT_CLIENT_APP,
        client_cpus=cfg.client_cpus,
        client_gpus=cfg.client_gpus,
        dropout_rate=cfg.dropout_rate,
        seed=cfg.seed,
        app_dir=app_dir,
        run_config=run_config,
    )
    try:
        yield grid
    finally:
        grid.shutdown()


def _quiet_flower() -> None:
    """Flower logs every sampling step at INFO; fedge prints its own progress."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
