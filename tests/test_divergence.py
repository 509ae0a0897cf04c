"""Weight divergence against a shadow centralized SGD, client drift and EMD in the history."""

import pytest
import torch

from fedge.config import RunConfig
from fedge.server.app import simulate
from fedge.server.divergence import layer_of, relative_distance, weight_divergence


def test_relative_distance_and_per_layer_divergence():
    sgd = {
        "fc.weight": torch.tensor([3.0, 4.0]),
        "fc.bias": torch.tensor([0.0]),
        "out.weight": torch.tensor([1.0]),
        "steps": torch.tensor(3),
    }  # ints are skipped
    fed = {
        "fc.weight": torch.tensor([3.0, 4.0]),
        "fc.bias": torch.tensor([5.0]),
        "out.weight": torch.tensor([2.0]),
        "steps": torch.tensor(9),
    }
    assert relative_distance(sgd, sgd) == 0.0
    got = weight_divergence(fed, sgd)
    assert got["divergence"] == pytest.approx((26 / 26) ** 0.5)
    assert got["divergence_layers"] == {"fc": pytest.approx(1.0), "out": pytest.approx(1.0)}
    assert layer_of("blocks.0.attn.weight") == "blocks.0.attn" and layer_of("scale") == "scale"


def test_divergence_is_zero_where_fedavg_is_sgd(run_dir):
    """One client, full participation, one full-batch local step: FedAvg is SGD."""
    cfg = RunConfig.from_mapping(
        dict(
            num_clients=1,
            rounds=2,
            local_epochs=1,
            batch_size=4000,
            lr=0.1,
            momentum=0.0,
            eval_fraction=0.0,
            backend="local",
            track_divergence=True,
            out=str(run_dir),
        )
    )
    history = simulate(cfg)
    for r in history:
        assert r["divergence"] < 1e-6 and max(r["divergence_layers"].values()) < 1e-6
        assert r["drift_mean"] > 1e-4  # the model did move
        assert r["emd_mean"] < 0.05  # one client holds (90% of) everything


def test_label_skew_diverges_more_than_iid(run_dir):
    def last(partition):
        cfg = RunConfig.from_mapping(
            dict(
                num_clients=10,
                rounds=1,
                local_epochs=1,
                batch_size=50,
                lr=0.05,
                momentum=0.5,
                partition=partition,
                eval_fraction=0.0,
                backend="local",
                track_divergence=True,
                out=str(run_dir / partition),
            )
        )
        return simulate(cfg)[-1]

    iid, one = last("iid"), last("label-k:1")
    assert one["emd_mean"] == pytest.approx(1.8, abs=0.02) and iid["emd_mean"] < 0.3
    assert one["emd_max"] >= one["emd_mean"]
    assert one["divergence"] > 2 * iid["divergence"] > 0
    assert one["drift_mean"] > iid["drift_mean"]
