"""One Flower App folder, unmodified, on fedge's RayGrid and on Flower's own simulation.

`fedge run --app DIR` (fedge's engine) and `fedge run --app DIR --backend flower` (Flower's
simulation of the folder, as `flwr run` starts it) run back to back, each in a fresh
process, once with few and once with more rounds; the difference of the wall times over
the difference of the rounds is the seconds per round, without start-up (Ray, imports).
fedge's `history.json` gives its median round too (rounds after the first).

    python benchmarks/flower_app.py --app DIR --num-clients 1000 \\
        --run-config 'fraction-train=0.05' --rounds 2,8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = {"fedge": "ray", "flower": "flower"}


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: timings on a shared machine need them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def timed_run(app: str, backend: str, clients: int, run_config: str, out: Path) -> float:
    """Wall seconds of one `fedge run --app` in a fresh process, working in `out` (where an
    app's relative output paths land)."""
    cmd = [sys.executable, "-m", "fedge.cli", "run", "--app", app, "--backend", backend]
    cmd += ["--num-clients", str(clients), "--run-config", run_config, "--out", "run"]
    out.mkdir(parents=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=out)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", required=True, help="a Flower App folder")
    parser.add_argument("--num-clients", type=int, default=100)
    parser.add_argument("--run-config", default="", help="the app's overrides, key=value ...")
    parser.add_argument("--rounds-key", default="num-server-rounds", help="its rounds key")
    parser.add_argument("--rounds", default="1,6", help="few,more rounds [1,6]")
    args = parser.parse_args()
    few, more = (int(r) for r in args.rounds.split(","))
    result: dict[str, object] = {"clients": args.num_clients, "load_before": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, backend in ENGINES.items():
            walls = []
            for rounds in (few, more):
                overrides = f"{args.run_config} {args.rounds_key}={rounds}".strip()
                out = Path(tmp, f"{name}-{rounds}")
                app = str(Path(args.app).resolve())
                walls.append(timed_run(app, backend, args.num_clients, overrides, out))
            result[f"{name}_wall_s"] = [round(w, 2) for w in walls]
            result[f"{name}_s_per_round"] = round((walls[1] - walls[0]) / (more - few), 4)
            history = Path(tmp, f"{name}-{more}", "run", "history.json")
            if history.exists():  # fedge's own record of each round, past the first
                seconds = sorted(r["seconds"] for r in json.loads(history.read_text())[1:])
                result[f"{name}_history_median_s_per_round"] = round(seconds[len(seconds) // 2], 4)
    result["load_after"] = load_average()
    fedge, flower = result["fedge_s_per_round"], result["flower_s_per_round"]
    assert isinstance(fedge, float) and isinstance(flower, float)
    result["flower_over_fedge"] = round(flower / fedge, 1) if fedge > 0 else None
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
