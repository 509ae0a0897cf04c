"""Zhao's EMD: 1.8 for a 1-class client, 1.6 for 2-class, shrinking as shared data is mixed in."""

import numpy as np
import pytest

from fedge.data.shared import federation
from fedge.data.stats import client_emds, emd, emd_summary, label_distribution, tv

BALANCED = np.repeat(np.arange(10), 100)


def test_emd_of_one_and_two_class_clients_of_ten_balanced_classes():
    p = label_distribution(BALANCED, 10)
    one = label_distribution(np.full(50, 3), 10)
    two = label_distribution(np.array([3] * 25 + [7] * 25), 10)
    assert emd(one, p) == pytest.approx(1.8)
    assert emd(two, p) == pytest.approx(1.6)
    assert emd(p, p) == 0.0
    assert tv(one, p) == pytest.approx(0.9)


def test_partitions_have_zhaos_emd():
    for scheme, expected in (("label-k:1", 1.8), ("label-k:2", 1.6)):
        parts = federation(BALANCED, 10, scheme, seed=0).parts
        assert client_emds(BALANCED, parts) == pytest.approx([expected] * 10)
    iid = federation(BALANCED, 10, "iid", seed=0).parts
    assert client_emds(BALANCED, iid).max() < 0.5


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_emd_after_a_balanced_share_of_g_is_mixed_in(beta):
    n_k, per_class_g = 100, 10
    g_share = np.repeat(np.arange(10), int(per_class_g * beta))  # balanced, beta |G| samples
    client = np.concatenate([np.full(n_k, 4), g_share])
    got = emd(label_distribution(client, 10), label_distribution(BALANCED, 10))
    assert got == pytest.approx(1.8 * n_k / (n_k + beta * 10 * per_class_g))


def test_summary_weights_by_client_size():
    summary = emd_summary([1.8, 0.0], [300, 100])
    assert summary == {"emd_mean": pytest.approx(1.35), "emd_max": 1.8}
    assert emd_summary([], []) == {}


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="no samples"):
        label_distribution(np.array([], dtype=int), 10)
    with pytest.raises(ValueError, match="0..9"):
        label_distribution(np.array([10]), 10)
    with pytest.raises(ValueError, match="differ in size"):
        emd(np.ones(3) / 3, np.ones(4) / 4)
