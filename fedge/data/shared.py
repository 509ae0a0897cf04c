"""The globally shared subset G of Zhao et al. 2018, and each client's local data.

G is a class-stratified random sample held out of the training pool before the clients'
partitions are cut, sized alpha = |G| / (data left to the clients) (`--shared-fraction`).
Each client mixes a random fraction beta of G (`--shared-per-client`) into its local
training data; the server may warm the initial model up on G.

`federation` and `client_split` are pure functions of the labels, the scheme and the
seed, so the ClientApp and the server (EMD, shadow SGD) compute the same splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedge.data.partition import partition

EVAL_FRACTION = 0.1  # of each client's own partition, held out for federated evaluation


@dataclass(frozen=True)
class Federation:
    """The clients' partitions (indices into the training pool) and the shared subset G."""

    parts: list[np.ndarray]
    shared: np.ndarray


def draw_shared(labels: np.ndarray, alpha: float, seed: int) -> np.ndarray:
    """G: alpha / (1 + alpha) of every class, so |G| = alpha * |rest| and G mirrors p."""
    if alpha < 0:
        raise ValueError(f"shared fraction must be >= 0, got {alpha}")
    labels = np.asarray(labels)
    if alpha == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x5EED])
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picked.append(rng.choice(idx, round(len(idx) * alpha / (1 + alpha)), replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64)


def federation(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    seed: int,
    groups: np.ndarray | None = None,
    shared_fraction: float = 0.0,
) -> Federation:
    """Hold G out of the pool, then partition the rest across `num_clients`."""
    labels = np.asarray(labels)
    shared = draw_shared(labels, shared_fraction, seed)
    rest = np.setdiff1d(np.arange(len(labels)), shared)
    sub_groups = None if groups is None else np.asarray(groups)[rest]
    parts = partition(labels[rest], num_clients, scheme, seed, sub_groups)
    return Federation(parts=[rest[p] for p in parts], shared=shared)


def client_split(
    fed: Federation, pid: int, seed: int, shared_per_client: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Client `pid`'s (train, eval) indices: eval is EVAL_FRACTION of its own partition,
    train is the rest plus its random beta-fraction of G."""
    if not 0 <= pid < len(fed.parts):
        raise ValueError(f"partition-id {pid} is outside 0..{len(fed.parts) - 1}")
    if not 0 <= shared_per_client <= 1:
        raise ValueError(f"shared per client must be in [0, 1], got {shared_per_client}")
    own = np.random.default_rng([seed, pid]).permutation(fed.parts[pid])
    n_eval = max(1, int(len(own) * EVAL_FRACTION)) if len(own) > 1 else 0
    take = round(len(fed.shared) * shared_per_client)
    mixed = np.random.default_rng([seed, pid, 0x5EED]).choice(fed.shared, take, replace=False)
    return np.concatenate([own[n_eval:], mixed]).astype(np.int64), own[:n_eval]
