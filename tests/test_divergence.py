"""Weight divergence against a shadow centralized SGD, client drift and EMD in the history."""

import pytest
import torch

from fedge.config import RunConfig
from fedge.data.divergence import (
    fedavg_steps,
    layer_of,
    mean_state,
    relative_distance,
    sgd_noise,
    sgd_replicas,
    weight_divergence,
)
from fedge.simulation import simulate
from fedge.tasks import TrainConfig, build_task


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


def test_fedavg_steps_weight_clients_by_size():
    # steps ceil(10/10)*2 = 2 and ceil(30/10)*2 = 6; FedAvg weights them 10:30
    assert fedavg_steps([10, 30], batch_size=10, epochs=2) == 5
    assert fedavg_steps([25, 25], batch_size=10, epochs=1) == 3
    with pytest.raises(ValueError, match="B >= 1"):
        fedavg_steps([10], batch_size=0, epochs=1)


def test_mean_state_and_sgd_noise():
    a = {"w": torch.tensor([1.0, 0.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 0.0]), "n": torch.tensor(5)}
    assert set(mean_state([a, b])) == {"w"}  # integer buffers are not weights
    assert mean_state([a, b])["w"].tolist() == [2.0, 0.0]
    assert sgd_noise([a, a]) == 0.0
    assert sgd_noise([a, b]) == pytest.approx(2.0 / 2.0)
    with pytest.raises(ValueError, match="two replicas"):
        sgd_noise([a])


def test_sgd_replicas_differ_only_by_data_order():
    task = build_task("digits", seed=0)
    model = task.build_model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    data = task.train_dataset(list(range(200)))
    train = TrainConfig(epochs=1, batch_size=10, lr=0.05, momentum=0.0)
    schedule = [(5, 0.05), (0, 0.05), (5, 0.05)]
    same = sgd_replicas(task, model, data, train, schedule, seeds=[7, 7])
    other = sgd_replicas(task, model, data, train, schedule, seeds=[7, 8])
    assert len(same) == 2 and len(same[0]) == 3
    assert sgd_noise([r[-1] for r in same]) == 0.0  # deterministic under the seed
    assert sgd_noise([r[-1] for r in other]) > 0  # another data order, another model
    assert relative_distance(same[0][1], same[0][0]) == 0.0  # a round of 0 steps
    assert relative_distance(same[0][0], initial) > 0  # the replicas trained a copy...
    assert relative_distance(model.state_dict(), initial) == 0.0  # ...not the model itself
