"""The simulation engines: `simulate(cfg)` runs a whole federation in this process tree.

`LocalGrid` (fedge.simulation.local_grid) calls the ClientApp in-process; `RayGrid`
(fedge.simulation.ray_grid) serves it from a pool of Ray actors; `backend = "flower"` uses
Flower's own `run_simulation`. All run the same ServerApp (`fedge.server.app.run_server`)
and ClientApp (`fedge.client.app.app`). With `devices` set, fedge's engines run on the
virtual clock of a device population (`fedge.simulation.clock`, `fedge.simulation.devices`).
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.serverapp import Grid

from fedge.config import RunConfig
from fedge.server.app import build_server_app, prepare, run_server
from fedge.server.history import load_history
from fedge.server.preflight import prepare_out
from fedge.simulation.clock import load_population, with_clock
from fedge.simulation.local_grid import VirtualGrid

__all__ = ["simulate"]


def simulate(cfg: RunConfig) -> list[dict[str, Any]]:
    """Run a whole federated simulation in this process tree and return its history.

    Every check that can run before any work runs first (`prepare`, `prepare_out`): a bad
    config, task, strategy, partition or `out` folder fails before an engine starts.
    """
    from fedge.client.app import app as client_app

    prepared = prepare(cfg)
    devices = load_population(cfg, prepared.task) if cfg.devices else None
    prepare_out(cfg)
    _quiet_flower()

    def on_clock(grid: VirtualGrid) -> Grid:
        return with_clock(grid, cfg, devices) if devices is not None else grid

    if cfg.backend == "ray":
        from fedge.simulation.ray_grid import RayGrid, init_ray

        init_ray(cfg.ray_address)
        grid = RayGrid(
            cfg.num_clients,
            client_cpus=cfg.client_cpus,
            client_gpus=cfg.client_gpus,
            dropout_rate=cfg.dropout_rate,
            seed=cfg.seed,
        )
        try:
            return run_server(on_clock(grid), cfg, prepared)
        finally:
            grid.shutdown()
    if cfg.backend == "local":
        from fedge.simulation.local_grid import LocalGrid

        return run_server(on_clock(LocalGrid(client_app, cfg.num_clients)), cfg, prepared)
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


def _quiet_flower() -> None:
    """Flower logs every sampling step at INFO; fedge prints its own progress."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
