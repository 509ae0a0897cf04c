"""Running an unmodified Flower App folder on fedge's engines (`fedge run --app DIR`).

fedge provides only the Grid: the app's own ServerApp runs in this process on a RayGrid
(or a LocalGrid), its ClientApp on the grid's virtual SuperNodes with the node config that
Flower's simulation gives them (`partition-id`, `num-partitions`), and every Context
carries the run config `flwr run` would give: the app's defaults with `run_config`'s
overrides fused in. `backend = "flower"` runs the same folder on Flower's own simulation,
for comparison. Each training round becomes a record of `history.json` (`RoundRecorder`).
Flower's log lines stay on, as under `flwr run`: the app may log its own results there.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, RecordDict

from fedge.app_folder import load_app
from fedge.compat import flower_app_simulation
from fedge.config import RunConfig
from fedge.server.app_rounds import RoundRecorder
from fedge.server.preflight import prepare_out


def run_app(cfg: RunConfig) -> list[dict[str, Any]]:
    """Run the Flower App in `cfg.app` on `cfg.backend` with `cfg.num_clients` virtual
    SuperNodes; return the history (also in `cfg.out/history.json`).

    The folder, the overrides and both components are checked (imported) before an engine
    starts, so a broken app fails in a second with one line saying why.
    """
    from fedge.simulation import engine

    cfg.validate()
    loaded = load_app(cfg.app, cfg.run_config)
    app, run_config = loaded.app, loaded.run_config
    out = prepare_out(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.backend == "flower":
        resources = {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus}
        components = (app.serverapp, app.clientapp)
        flower_app_simulation(
            app.path, components, cfg.num_clients, loaded.overrides, run_config, resources
        )
        return []
    with engine(cfg, loaded.client_app, app.clientapp, str(app.path), run_config) as grid:
        recorder = RoundRecorder(grid, out)
        context = Context(grid.run_id, 0, {}, RecordDict(), dict(run_config))
        try:
            loaded.server_app(recorder, context)
        finally:
            recorder.finish()
    return recorder.records
