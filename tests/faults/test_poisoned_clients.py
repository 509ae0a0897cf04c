"""Fault: 20% of clients send poisoned (sign-flipped, boosted) updates that pass validation.
FedAvg is dragged to a standstill; robust aggregation still learns."""

import pytest

from fedge.simulation import simulate

POISON = dict(num_clients=10, rounds=2, faults="signflip:0.2")


@pytest.fixture(scope="module")
def fedavg_accuracy(tmp_path_factory, small_run):
    out = tmp_path_factory.mktemp("fedavg")
    return simulate(small_run(out, strategy="fedavg", **POISON))[-1]["accuracy"]


@pytest.mark.parametrize(
    "strategy, options",
    [("fedmedian", {}), ("fedtrimmedavg", {"beta": 0.2}), ("krum", {"num_malicious_nodes": 2})],
)
def test_robust_aggregation_learns_despite_poison(
    tmp_path, strategy, options, fedavg_accuracy, small_run
):
    history = simulate(small_run(tmp_path, strategy=strategy, strategy_options=options, **POISON))
    assert all(r["rejected"] == 0 for r in history)  # the poison passes the norm check
    assert history[-1]["accuracy"] > max(0.5, fedavg_accuracy + 0.3)  # chance is 0.1
