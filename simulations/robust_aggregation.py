"""Byzantine clients against robust aggregation: who still learns with 20% poisoned updates?

Each run: digits, 10 clients (all sampled), a fraction of them simulating a fault every round
(`--faults`), one strategy. The table gives the final accuracy and how many updates the
server's validation rejected. Run: `python simulations/robust_aggregation.py`.
"""

from __future__ import annotations

import argparse
import time

from fedge.config import RunConfig
from fedge.simulation import simulate

STRATEGY_OPTIONS = {
    "fedavg": {},
    "fedmedian": {},
    "fedtrimmedavg": {"beta": 0.2},
    "krum": {"num_malicious_nodes": 2},
}


def run(strategy: str, faults: str, args: argparse.Namespace) -> dict:
    cfg = RunConfig.from_mapping(
        {
            "backend": "local",
            "num_clients": args.clients,
            "rounds": args.rounds,
            "local_epochs": 1,
            "eval_fraction": 0,
            "strategy": strategy,
            "strategy_options": STRATEGY_OPTIONS[strategy],
            "faults": faults,
            "max_update_norm": args.max_update_norm,
            "task_options": {"model": "mlp"},
            "out": f"{args.runs}/{strategy}-{faults or 'clean'}-{args.max_update_norm:g}",
        }
    )
    started = time.perf_counter()
    history = simulate(cfg)
    last = history[-1]
    return {
        "accuracy": last["accuracy"],
        "rejected": sum(r.get("rejected", 0) for r in history),
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strategies", default=",".join(STRATEGY_OPTIONS))
    parser.add_argument("--attacks", default=",signflip:0.2,noise=1:0.2,scale:0.2")
    parser.add_argument("--max-update-norm", type=float, default=10.0, help="0: no norm check")
    parser.add_argument("--runs", default="runs/robust")
    args = parser.parse_args()
    rows = []
    for attack in args.attacks.split(","):
        for strategy in args.strategies.split(","):
            result = run(strategy, attack, args)
            rows.append((attack or "none", strategy, result))
            print(f"{attack or 'none':>14} {strategy:>14}: {result}", flush=True)
    print("\n| poisoned clients | max update norm | strategy | final accuracy | rejected | s |")
    print("|---|---|---|---|---|---|")
    for attack, strategy, r in rows:
        print(
            f"| {attack} | {args.max_update_norm:g} | {strategy} | {r['accuracy']:.3f} | "
            f"{r['rejected']} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
