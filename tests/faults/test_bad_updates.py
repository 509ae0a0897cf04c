"""Faults: corrupt, NaN, Inf, wrongly shaped or typed and absurdly large updates are rejected
with a reason and never reach aggregation; the run goes on and learns from the others."""

import math

import pytest
import torch

from fedge.simulation import simulate


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("corrupt", "cannot be decoded"),
        ("nan", "NaN/Inf"),
        ("inf", "NaN/Inf"),
        ("shape", "shape"),
        ("dtype", "dtype float16"),
        ("scale", "update norm"),
    ],
)
def test_bad_update_is_rejected_and_the_run_learns(tmp_path, fault, reason, small_run):
    history = simulate(small_run(tmp_path / fault, faults=f"{fault}:0.25"))
    for record in history:
        assert record["rejected"] == 1 and record["failures"] == 1
        assert record["num_clients"] == 3
        [why] = record["failure_reasons"]
        assert "update rejected by the server" in why and reason in why
    assert history[-1]["accuracy"] > 0.6  # chance is 0.1
    final = torch.load(tmp_path / fault / "final_model.pt")
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    assert all(math.isfinite(r["loss"]) for r in history)
