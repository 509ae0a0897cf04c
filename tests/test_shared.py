"""The shared subset G: held out of the partitions, sized alpha, stratified, mixed in at beta."""

import numpy as np
import pytest

from fedge.data.shared import EVAL_FRACTION, client_split, draw_shared, federation
from fedge.data.stats import client_emds

LABELS = np.repeat(np.arange(10), 210)


def test_g_is_held_out_stratified_and_sized_alpha():
    fed = federation(LABELS, 10, "label-k:1", seed=0, shared_fraction=0.05)
    rest = np.concatenate(fed.parts)
    assert len(np.intersect1d(rest, fed.shared)) == 0
    assert np.array_equal(np.sort(np.concatenate([rest, fed.shared])), np.arange(len(LABELS)))
    assert len(fed.shared) == 100 and len(rest) == 2000  # |G| = alpha * client data
    assert np.bincount(LABELS[fed.shared]).tolist() == [10] * 10
    assert [len(np.unique(LABELS[p])) for p in fed.parts] == [1] * 10


def test_alpha_zero_leaves_the_partitions_exactly_as_partition_makes_them():
    from fedge.data.partition import partition

    fed = federation(LABELS, 10, "dirichlet:0.5", seed=2)
    assert len(fed.shared) == 0
    direct = partition(LABELS, 10, "dirichlet:0.5", seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(fed.parts, direct, strict=True))


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_clients_mix_in_a_random_beta_fraction_of_g(beta):
    fed = federation(LABELS, 10, "label-k:1", seed=0, shared_fraction=0.05)
    shares = []
    for pid in range(10):
        train, held = client_split(fed, pid, seed=0, shared_per_client=beta)
        own = set(fed.parts[pid].tolist())
        assert len(held) == int(len(fed.parts[pid]) * EVAL_FRACTION) and set(held) <= own
        share = [i for i in train if i not in own]
        assert set(share) <= set(fed.shared.tolist()) and len(share) == round(100 * beta)
        assert set(held).isdisjoint(train)
        shares.append(frozenset(share))
        assert np.array_equal(train, client_split(fed, pid, seed=0, shared_per_client=beta)[0])
    assert (len(set(shares)) == 1) == (beta == 1.0)  # beta < 1: different random shares


def test_mixing_in_g_lowers_emd_as_zhao_predicts():
    fed = federation(LABELS, 10, "label-k:1", seed=0, shared_fraction=0.05)
    trains = [client_split(fed, pid, seed=0)[0] for pid in range(10)]
    n_k = len(fed.parts[0]) - int(len(fed.parts[0]) * EVAL_FRACTION)
    expected = 1.8 * n_k / (n_k + len(fed.shared))  # G is balanced and beta = 1
    assert client_emds(LABELS, trains) == pytest.approx([expected] * 10, abs=1e-9)


def test_bad_fractions_are_explained():
    with pytest.raises(ValueError, match="shared fraction"):
        draw_shared(LABELS, -0.1, 0)
    fed = federation(LABELS, 10, "iid", seed=0, shared_fraction=0.1)
    with pytest.raises(ValueError, match="shared per client"):
        client_split(fed, 0, 0, 1.5)
    with pytest.raises(ValueError, match="partition-id"):
        client_split(fed, 10, 0)


def test_end_to_end_run_with_shared_data_and_warm_up(run_dir):
    from fedge.config import RunConfig
    from fedge.simulation import simulate
    from fedge.tasks import build_task

    cfg = RunConfig.from_mapping(
        dict(
            num_clients=10,
            rounds=1,
            partition="label-k:1",
            shared_fraction=0.1,
            warmup_epochs=1,
            local_epochs=1,
            batch_size=50,
            lr=0.02,
            momentum=0.5,
            eval_fraction=0.0,
            backend="local",
            out=str(run_dir),
        )
    )
    (record,) = simulate(cfg)
    labels = build_task("digits").train_labels()
    fed = federation(labels, 10, "label-k:1", seed=0, shared_fraction=0.1)
    trains = [client_split(fed, pid, seed=0)[0] for pid in range(10)]
    emds, sizes = client_emds(labels, trains), np.array([len(t) for t in trains])
    assert record["emd_mean"] == pytest.approx(float((emds * sizes).sum() / sizes.sum()))
    n_k = sizes.mean() - len(fed.shared)  # G is stratified, so about balanced
    assert record["emd_mean"] == pytest.approx(1.8 * n_k / (n_k + len(fed.shared)), abs=0.02)
    assert record["examples_seen"] == sizes.sum()
    assert record["failures"] == 0 and record["drift_mean"] > 0


def test_warm_up_trains_the_initial_model_on_g():
    from fedge.config import RunConfig
    from fedge.data.divergence import run_federation, warm_up
    from fedge.tasks import build_task

    cfg = RunConfig(partition="label-k:1", shared_fraction=0.1, warmup_epochs=5, batch_size=20)
    task = build_task("digits")
    model, test = task.build_model(), task.test_dataset()
    before = task.evaluate(model, test)["accuracy"]
    warm_up(task, model, cfg, run_federation(task, cfg))
    assert task.evaluate(model, test)["accuracy"] > before + 0.4
