"""A deployed round on fedge's edge runtime against Flower's stock SuperNodes and against the
simulated round of the same run.

The same run (digits, N devices, 5 rounds, federated evaluation on every device) three ways,
in one go on one machine: `fedge server` + N `fedge client --isolation subprocess` (Flower's
SuperNode, one `flwr-clientapp` process per message, default settings); `fedge server` + N
`fedge client` (fedge's runtime); `fedge run` (the simulation, with the runtime's default
torch thread count, as the devices have). A sampler reads /proc every 0.2 s: each device's
resident memory (its process and all descendants summed; the peak is the device's peak) and
its CPU seconds (processes that live under 0.2 s may be missed). Both deployed runs use
`fedge server` (its grid polls without Flower's 3 s sleeps): they differ in the devices only.

    python benchmarks/deployment.py                  # 3 and 10 devices
    python benchmarks/deployment.py --devices 3 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from fedge.edge.supervisor import default_torch_threads
from fedge.processes import free_port, start, stop

FEDGE = [sys.executable, "-m", "fedge.cli"]
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def process_stats() -> dict[int, tuple[int, float, int]]:
    """pid -> (parent pid, CPU seconds so far, resident bytes) of every process."""
    stats = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
        stats[int(name)] = (int(fields[1]), cpu, int(fields[21]) * PAGE)
    return stats


class DeviceSampler:
    """Peak resident bytes and CPU seconds of each device: a process and its descendants."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self.peak = dict.fromkeys(roots, 0)
        self.cpu: dict[int, dict[int, float]] = {r: {} for r in roots}  # per pid, last seen
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.done.wait(0.2):
            stats = process_stats()
            children: dict[int, list[int]] = {}
            for pid, (parent, _, _) in stats.items():
                children.setdefault(parent, []).append(pid)
            for root in self.roots:
                total, stack = 0, [root]
                while stack:
                    pid = stack.pop()
                    if pid in stats:
                        total += stats[pid][2]
                        self.cpu[root][pid] = stats[pid][1]
                        stack += children.get(pid, [])
                self.peak[root] = max(self.peak[root], total)

    def stop(self) -> tuple[float, float]:
        """(max over devices of peak MiB, mean over devices of CPU seconds)."""
        self.done.set()
        self.thread.join()
        cpu = [sum(per_pid.values()) for per_pid in self.cpu.values()]
        return max(self.peak.values()) / 2**20, sum(cpu) / len(cpu)


def run_flags(devices: int, rounds: int) -> list[str]:
    # the benchmark owns its run folders: a rerun replaces them
    return ["--task", "digits", "--num-clients", str(devices), "--rounds", str(rounds)] + [
        "--eval-fraction",
        "1",
        "--overwrite",
    ]


def deployed(isolation: str, devices: int, rounds: int, out: Path) -> dict[str, Any]:
    """One deployed run; its history and the devices' peak memory and CPU."""
    port, logs = free_port(), out.parent / f"{out.name}-logs"  # the run folder starts empty
    logs.mkdir(parents=True, exist_ok=True)
    server = start(
        [*FEDGE, "server", *run_flags(devices, rounds), "--port", str(port), "--out", str(out)],
        log=logs / "server",
    )
    clients = [
        start(
            [*FEDGE, "client", "--server", f"127.0.0.1:{port}", "--isolation", isolation]
            + ["--partition-id", str(i), "--num-partitions", str(devices)],
            log=logs / f"client{i}",
        )
        for i in range(devices)
    ]
    sampler = DeviceSampler([c.pid for c in clients])
    try:
        if server.wait(timeout=3600) != 0:
            raise RuntimeError(f"{isolation} run failed; see {logs / 'server'}")
    finally:
        peak_mb, cpu = sampler.stop()
        for proc in [server, *clients]:
            stop(proc, grace=5)
    history = json.loads((out / "history.json").read_text())
    return {"history": history, "peak_mb": peak_mb, "cpu_per_round": cpu / rounds}


def simulated(devices: int, rounds: int, out: Path) -> dict[str, Any]:
    cmd = [*FEDGE, "run", *run_flags(devices, rounds), "--backend", "local", "--out", str(out)]
    # one torch thread, as each runtime has by default on 2 cores (`--torch-threads`)
    env = {**os.environ, "OMP_NUM_THREADS": str(default_torch_threads())}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return {"history": json.loads((out / "history.json").read_text())}


def later(history: list[dict[str, Any]], key: str) -> float:
    """Mean of `key` over rounds 2.. (round 1 also loads the runtime's task and data)."""
    values = [r[key] for r in history[1:] if r.get(key) is not None] or [
        r[key] for r in history if r.get(key) is not None
    ]
    return sum(values) / len(values) if values else float("nan")


def row(name: str, devices: int, result: dict[str, Any], stock: float | None, sim: float) -> str:
    h = result["history"]
    per_round = later(h, "seconds")
    cells = [
        name,
        str(devices),
        f"{h[0]['seconds']:.1f}",
        f"{per_round:.2f}",
        f"{stock / per_round:.1f}x" if stock else "-",
        f"{per_round / sim:.2f}",
        f"{later(h, 'train_seconds_mean'):.2f}",
        f"{later(h, 'wait_seconds_mean'):.2f}",
        f"{later(h, 'first_compute_seconds_mean'):.2f}",
        f"{later(h, 'upload_seconds_mean'):.2f}",
        f"{later(h, 'device_seconds_max'):.2f}",
        f"{result['peak_mb']:.0f}" if "peak_mb" in result else "-",
        f"{result['cpu_per_round']:.2f}" if "cpu_per_round" in result else "-",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="runs/bench-deployment")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(f"commit {commit}, {os.cpu_count()} cores, load average at start: {load_average()}")
    header = (
        "| run | devices | round 1 s | s/round (2..) | vs stock | vs simulated | train s "
        "| wait s | first compute s | upload s | device s max | device peak MiB "
        "| CPU s/device/round |"
    )
    print(header + "\n|" + "---|" * 13, flush=True)
    for n in args.devices:
        base = Path(args.out) / f"{n}"
        fedge = deployed("runtime", n, args.rounds, base / "runtime")
        stock = deployed("subprocess", n, args.rounds, base / "stock")
        sim = simulated(n, args.rounds, base / "simulated")
        sim_s, stock_s = later(sim["history"], "seconds"), later(stock["history"], "seconds")
        print(row("Flower stock SuperNodes", n, stock, None, sim_s), flush=True)
        print(row("fedge edge runtime", n, fedge, stock_s, sim_s), flush=True)
        print(row("simulated (fedge run)", n, sim, stock_s, sim_s), flush=True)
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
