"""Split a training pool across clients: IID, label skew, Dirichlet and quantity skew.

Every scheme works on a plain vector of per-sample labels, so it serves any task. Each
sample lands in exactly one partition and the split is a pure function of the seed.

Schemes (the `--partition` value):
- `iid`: a uniform random split into equal parts.
- `label-k:K`: Zhao et al.'s K-class non-IID: sort by label, cut into `num_partitions * K`
  shards, give each client K shards of distinct labels where possible.
- `dirichlet:ALPHA`: per class, proportions over clients drawn from Dir(ALPHA).
- `quantity:ALPHA`: IID labels, client sizes drawn from Dir(ALPHA) (quantity skew).
- `natural`: the task's own groups (speaker, topic), groups dealt round-robin to clients.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("iid", "label-k:K", "dirichlet:ALPHA", "quantity:ALPHA", "natural")


def parse_scheme(scheme: str) -> tuple[str, float]:
    """Split `name:arg` and check it; the error lists what is allowed."""
    name, _, arg = scheme.partition(":")
    try:
        if name in ("iid", "natural") and not arg:
            return name, 0.0
        if name == "label-k" and int(arg) >= 1 and str(int(arg)) == arg:
            return name, float(int(arg))
        if name in ("dirichlet", "quantity") and float(arg) > 0:
            return name, float(arg)
    except ValueError:
        pass
    raise ValueError(f"partition {scheme!r} is not valid; use one of {', '.join(SCHEMES)}")


def partition(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str = "iid",
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Indices of each partition's samples, sorted, covering every sample exactly once."""
    name, arg = parse_scheme(scheme)
    labels = np.asarray(labels)
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if len(labels) < num_partitions:
        raise ValueError(
            f"cannot split {len(labels)} samples into {num_partitions} partitions; "
            "use fewer clients or more data"
        )
    rng = np.random.default_rng(seed)
    if name == "iid":
        parts = np.array_split(rng.permutation(len(labels)), num_partitions)
    elif name == "label-k":
        parts = _label_k(labels, num_partitions, int(arg), rng)
    elif name == "dirichlet":
        parts = _dirichlet(labels, num_partitions, arg, rng)
    elif name == "quantity":
        parts = _quantity(len(labels), num_partitions, arg, rng)
    else:
        if groups is None:
            raise ValueError("partition 'natural' needs a task with natural groups")
        parts = _natural(np.asarray(groups), num_partitions, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _label_k(labels: np.ndarray, n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Zhao's K-class split: n*k single-label shards, client i takes shards i, i+n, ..., i+(k-1)n.

    Shards are laid out class after class (classes in random order), each class cut into
    as many shards as its share of n*k. A class spans at most n consecutive shards when
    k <= classes, so shards n apart never share a label: every client gets exactly k labels.
    """
    classes, counts = np.unique(labels, return_counts=True)
    if k > len(classes):
        raise ValueError(
            f"label-k:{k} needs at least {k} classes but the labels have {len(classes)}"
        )
    num_shards = n * k
    if num_shards < len(classes):
        raise ValueError(
            f"label-k:{k} with {n} clients makes {num_shards} shards for {len(classes)} classes; "
            f"every sample must be used, so use at least {-(-len(classes) // k)} clients"
        )
    # shards per class: proportional to the class's size, at least one, summing to n*k
    per_class = np.maximum(1, np.floor(counts / counts.sum() * num_shards).astype(int))
    while per_class.sum() != num_shards:
        step = 1 if per_class.sum() < num_shards else -1
        room = (
            counts / per_class
            if step == 1
            else np.where(per_class > 1, -counts / per_class, -np.inf)
        )
        per_class[int(np.argmax(room))] += step
    if (per_class > n).any() or (per_class > counts).any():
        raise ValueError(
            f"label-k:{k} with {n} clients cannot give every client {k} distinct classes "
            f"(class sizes {counts.tolist()}); use fewer clients or another scheme"
        )
    shards: list[np.ndarray] = []
    for c in rng.permutation(len(classes)):
        idx = rng.permutation(np.flatnonzero(labels == classes[c]))
        shards.extend(np.array_split(idx, per_class[c]))
    order = rng.permutation(n)  # which client gets which column of shards
    return [np.concatenate([shards[order[i] + j * n] for j in range(k)]) for i in range(n)]


def _dirichlet(
    labels: np.ndarray, n: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class, split its samples over clients with Dir(alpha) proportions."""
    parts: list[list[int]] = [[] for _ in range(n)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(n, alpha))) * len(idx)).astype(int)[:-1]
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].extend(chunk.tolist())
    _fill_empty(parts, rng)
    return [np.array(p) for p in parts]


def _quantity(size: int, n: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """IID samples, client sizes from Dir(alpha); every client gets at least one sample."""
    sizes = 1 + np.floor(rng.dirichlet(np.full(n, alpha)) * (size - n)).astype(int)
    sizes[rng.integers(n)] += size - sizes.sum()
    return np.split(rng.permutation(size), np.cumsum(sizes)[:-1])


def _natural(groups: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Whole groups per client; with fewer groups than clients, groups are split evenly."""
    uniq = rng.permutation(np.unique(groups))
    if len(uniq) >= n:
        owner = np.arange(len(uniq)) % n
        client_of = owner[np.argsort(uniq)[np.searchsorted(np.sort(uniq), groups)]]
        return [np.flatnonzero(client_of == c) for c in range(n)]
    parts: list[np.ndarray] = []
    per_group = np.array_split(np.arange(n), len(uniq))
    for g, clients in zip(uniq, per_group, strict=True):
        parts.extend(np.array_split(rng.permutation(np.flatnonzero(groups == g)), len(clients)))
    return parts


def _fill_empty(parts: list[list[int]], rng: np.random.Generator) -> None:
    """Move one sample from the largest partition into each empty one."""
    for p in parts:
        if not p:
            largest = max(parts, key=len)
            p.append(largest.pop(int(rng.integers(len(largest)))))
