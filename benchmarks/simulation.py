"""fedge's RayGrid against Flower's run_simulation: same ClientApp, same FedAvg, same sampling.

Each configuration runs in a fresh process; a sampler adds up the resident memory of that
process and all its children (Ray's workers included) every 0.2 s.

    python benchmarks/simulation.py                      # 1k, 10k, 100k clients; 5 KB and 4 MB
    python benchmarks/simulation.py --populations 1000 --models small
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {"small": 1280, "4MB": 1 << 20}  # float32 counts: 5 KB and 4 MB


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: timings on a shared machine need them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def child(engine: str, nodes: int, sampled: int, rounds: int, floats: int) -> None:
    """Runs in the measured process: one engine, one population; prints round times."""
    sys.path.insert(0, str(HERE))
    import logging

    import sim_apps

    logging.getLogger("flwr").setLevel(logging.WARNING)
    times: list[float] = []
    if engine == "fedge":
        from fedge.simulation.ray_grid import RayGrid, init_ray

        init_ray()
        grid = RayGrid(nodes, app_spec="sim_apps:client_app", client_cpus=1)
        times = sim_apps.run_rounds(grid, nodes, sampled, rounds, floats)
    else:
        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation

        app = ServerApp()

        @app.main()
        def main(grid, context):
            times.extend(sim_apps.run_rounds(grid, nodes, sampled, rounds, floats))

        run_simulation(
            app,
            sim_apps.client_app,
            num_supernodes=nodes,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    print("RESULT " + json.dumps(times), flush=True)


def measure(engine: str, nodes: int, sampled: int, rounds: int, model: str) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, __file__, "--child", engine, str(nodes), str(sampled), str(rounds)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd + [str(MODELS[model])], stdout=subprocess.PIPE, text=True, env=env)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - start
    line = next((line for line in out.splitlines() if line.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{engine} at {nodes} clients failed (status {proc.returncode})")
    times = json.loads(line[7:])
    after_first = sum(times[1:]) / max(len(times) - 1, 1)
    return {
        "wall_s": wall,
        "s_per_round": after_first,
        "updates_per_s": sampled / after_first,
        "peak_rss_gib": peak / 2**30,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        engine, nodes, sampled, rounds, floats = sys.argv[2], *map(int, sys.argv[3:7])
        child(engine, nodes, sampled, rounds, floats)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--populations", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sampled", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = []
    header = (
        "| model | clients | engine | wall s | s/round after 1st | updates/s | peak RSS GiB |"
        " fedge/Flower updates/s | fedge/Flower RSS |"
    )
    print(f"load average at start: {load_average()}", flush=True)
    print(header + "\n|" + "---|" * 9, flush=True)
    for model in args.models:
        for nodes in args.populations:
            res = {
                e: measure(e, nodes, args.sampled, args.rounds, model) for e in ("flower", "fedge")
            }
            speed = res["fedge"]["updates_per_s"] / res["flower"]["updates_per_s"]
            mem = res["fedge"]["peak_rss_gib"] / res["flower"]["peak_rss_gib"]
            for engine, r in res.items():
                ratio = (f"{speed:.1f}x", f"{mem:.2f}") if engine == "fedge" else ("", "")
                cells = [model, f"{nodes:,}", engine, f"{r['wall_s']:.1f}"]
                cells += [f"{r['s_per_round']:.3f}", f"{r['updates_per_s']:.0f}"]
                cells += [f"{r['peak_rss_gib']:.2f}", *ratio]
                print("| " + " | ".join(cells) + " |", flush=True)
                rows.append({"model": model, "clients": nodes, "engine": engine, **r})
    print(f"load average at end: {load_average()}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
