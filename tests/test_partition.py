"""Partition schemes: coverage, each sample once, exactly K classes, Dirichlet concentration,
determinism and clear errors."""

import numpy as np
import pytest

from fedge.data.partition import parse_scheme, partition

LABELS = np.repeat(np.arange(10), 100)[np.random.default_rng(7).permutation(1000)]


def assert_exact_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize(
    "scheme", ["iid", "label-k:1", "label-k:2", "label-k:3", "dirichlet:0.5", "quantity:1.0"]
)
def test_every_sample_lands_in_exactly_one_partition_and_is_deterministic(scheme):
    parts = partition(LABELS, 10, scheme, seed=3)
    assert_exact_cover(parts, len(LABELS))
    again = partition(LABELS, 10, scheme, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(LABELS, 10, scheme, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_label_k_gives_every_client_exactly_k_classes(k):
    # unbalanced classes too: shard boundaries must never mix two labels
    labels = np.concatenate([np.full(80 + 7 * c, c) for c in range(10)])
    parts = partition(labels, 10, f"label-k:{k}", seed=1)
    assert_exact_cover(parts, len(labels))
    assert [len(np.unique(labels[p])) for p in parts] == [k] * 10


def test_label_k_needs_enough_clients_and_classes():
    with pytest.raises(ValueError, match="at least 10 clients"):
        partition(LABELS, 4, "label-k:1")
    with pytest.raises(ValueError, match="needs at least 11 classes"):
        partition(LABELS, 10, "label-k:11")


def test_iid_parts_are_equal_sized_and_class_balanced():
    parts = partition(LABELS, 10, "iid", seed=0)
    assert {len(p) for p in parts} == {100}
    counts = np.array([np.bincount(LABELS[p], minlength=10) for p in parts])
    assert counts.max() < 30  # 10 expected per class


def test_dirichlet_concentration_controls_label_skew():
    labels = np.repeat(np.arange(10), 500)

    def mean_max_share(alpha):
        parts = partition(labels, 20, f"dirichlet:{alpha}", seed=0)
        assert_exact_cover(parts, len(labels))
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    skewed, mild, flat = mean_max_share(0.05), mean_max_share(1.0), mean_max_share(100.0)
    assert skewed > 0.7 > mild > flat
    assert flat < 0.2  # nearly IID: about 1/10 of each class


def test_quantity_skew_keeps_labels_iid_but_sizes_uneven():
    labels = np.repeat(np.arange(10), 500)
    parts = partition(labels, 10, "quantity:0.3", seed=0)
    assert_exact_cover(parts, len(labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) > 10 * min(sizes)
    even = [len(p) for p in partition(labels, 10, "quantity:1000", seed=0)]
    assert max(even) < 1.2 * min(even)
    big = max(parts, key=len)
    assert np.bincount(labels[big], minlength=10).min() > 0.5 * len(big) / 10


def test_natural_keeps_each_group_on_one_client():
    groups = np.repeat(np.arange(25), 8)
    parts = partition(np.zeros(len(groups)), 10, "natural", seed=0, groups=groups)
    assert_exact_cover(parts, len(groups))
    owners = {g: {i for i, p in enumerate(parts) if g in set(groups[p])} for g in range(25)}
    assert all(len(o) == 1 for o in owners.values())
    # fewer groups than clients: groups are split, still one group per client
    parts = partition(np.zeros(len(groups)), 50, "natural", seed=0, groups=groups)
    assert_exact_cover(parts, len(groups))
    assert all(len(np.unique(groups[p])) == 1 for p in parts)
    with pytest.raises(ValueError, match="natural groups"):
        partition(LABELS, 10, "natural")


@pytest.mark.parametrize("bad", ["label-k:0", "label-k:1.5", "dirichlet:-1", "zipf", "iid:3"])
def test_bad_schemes_name_the_allowed_ones(bad):
    with pytest.raises(ValueError, match="label-k:K"):
        parse_scheme(bad)
