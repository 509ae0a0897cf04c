"""SecAgg+ against plain FedAvg: seconds per round and bytes per client, in one run.

The same fedge run (digits, every client sampled, one local epoch) on fedge's RayGrid, with and
without `--secure-aggregation`, for 10, 100 and 1,000 clients a round. The first round warms
the Ray actors (task and data loaded); the table gives the mean of the rounds after it. Bytes
are message payloads (arrays, config and metric values) counted at the Grid, per client and
round, both ways. Peak RSS is this process and its children (Ray's workers) sampled every 0.2 s.

    python benchmarks/secagg.py                        # 10, 100, 1000 clients a round
    python benchmarks/secagg.py --clients 10 100 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from simulation import load_average, tree_rss  # noqa: E402  (benchmarks/ is no package)

from fedge.config import RunConfig  # noqa: E402
from fedge.server.app import prepare, run_server  # noqa: E402
from fedge.server.observer import PassThroughGrid  # noqa: E402
from fedge.simulation.ray_grid import RayGrid, init_ray  # noqa: E402


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's arrays, config and metric values (numbers count 8)."""

    def size(value: Any) -> int:
        if isinstance(value, bytes | str):
            return len(value)
        if isinstance(value, list):
            return sum(size(v) for v in value)
        return 8

    total = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    for records in (content.config_records, content.metric_records):
        total += sum(size(v) for rec in records.values() for v in rec.values())
    return total


class CountingGrid(PassThroughGrid):
    """Counts the payload bytes that go down to the clients and come back up."""

    def __init__(self, grid: RayGrid) -> None:
        super().__init__(grid)
        self.down = self.up = 0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self.down += sum(payload_bytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.up += sum(payload_bytes(r.content) for r in replies if r.has_content())
        return replies


def measure(clients: int, rounds: int, secure: bool, out: Path) -> dict[str, Any]:
    cfg = RunConfig.from_mapping(
        {
            "backend": "ray",
            "num_clients": clients,
            "rounds": rounds,
            "local_epochs": 1,
            "eval_fraction": 0,
            "secure_aggregation": secure,
            "out": str(out / f"{clients}-{'secagg' if secure else 'plain'}"),
        }
    )
    grid = RayGrid(clients, seed=cfg.seed)
    counter = CountingGrid(grid)
    try:
        history = run_server(counter, cfg, prepare(cfg))
    finally:
        grid.shutdown()
    last, timed = history[-1], history[1:] or history
    per_client = clients * rounds
    return {
        "clients": clients,
        "secure": secure,
        "s_per_round": sum(r["seconds"] for r in timed) / len(timed),
        "protocol_s": sum(r.get("secagg_seconds", 0.0) for r in timed) / len(timed),
        "down_bytes": counter.down / per_client,
        "up_bytes": counter.up / per_client,
        "degree": last.get("secagg_degree", ""),
        "threshold": last.get("secagg_threshold", ""),
        "aggregated": last.get("secagg_aggregated", last["num_clients"]),
        "accuracy": last["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    peak = {"bytes": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["bytes"] = max(peak["bytes"], tree_rss(os.getpid()))
            done.wait(0.2)

    threading.Thread(target=sample, daemon=True).start()
    init_ray()
    print(f"load average at start: {load_average()}", flush=True)
    print(
        "| clients a round | aggregation | s/round | of it protocol s | secagg/plain time "
        "| KB down/client | KB up/client | degree k | t | peak RSS GiB |\n|" + "---|" * 10,
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedge-secagg-bench-") as tmp:
        for clients in args.clients:
            pair = {}
            for secure in (False, True):
                peak["bytes"] = 0
                row = measure(clients, args.rounds, secure, Path(tmp))
                row["peak_rss_gib"] = peak["bytes"] / 2**30
                pair[secure] = row
                rows.append(row)
                ratio = f"{row['s_per_round'] / pair[False]['s_per_round']:.2f}x" if secure else ""
                cells = [
                    f"{clients:,}",
                    "SecAgg+" if secure else "FedAvg",
                    f"{row['s_per_round']:.2f}",
                    f"{row['protocol_s']:.2f}" if secure else "",
                    ratio,
                    f"{row['down_bytes'] / 1e3:.1f}",
                    f"{row['up_bytes'] / 1e3:.1f}",
                    str(row["degree"]),
                    str(row["threshold"]),
                    f"{row['peak_rss_gib']:.2f}",
                ]
                print("| " + " | ".join(cells) + " |", flush=True)
    done.set()
    print(f"load average at end: {load_average()}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
