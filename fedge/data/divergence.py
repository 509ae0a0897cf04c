"""What non-IID data does to a round (Zhao et al. 2018): label skew, client drift and
weight divergence from centralized SGD.

- `label_skew`: n_k-weighted mean and max EMD of the clients that trained this round (each
  client reports the EMD of its training data, G included, as the metric `emd`; a device
  with its own data reports its label counts, measured against the server's data).
- `client_drift`: ||w_k - w_t|| / ||w_t|| of each reply against the model it was sent (the
  server measures it once per reply while validating the update).
- `ShadowSGD` + `weight_divergence`: a centralized SGD run on the pooled client data from
  the same initial weights; as in Zhao et al.'s analysis, m rounds of T local steps are
  matched with mT centralized steps (same batch size, learning rate and momentum);
  ||w_FedAvg - w_SGD|| / ||w_SGD|| per layer and for the whole model (simulation only).
- `run_federation`, `warm_up`, `shadow_sgd`: the server's side of the same protocol: the
  clients' partitions and G as the clients compute them, Zhao's warm-up of the initial
  model on G, and the pooled data for the shadow SGD.
- `sgd_replicas`, `mean_state`, `sgd_noise`, `fedavg_steps`: the offline protocol of
  simulations/zhao_noniid.py: divergence against the mean of several SGD runs (different
  data orders), SGD's own run-to-run spread as the noise floor, and steps matched to what
  FedAvg's n_k-weighted average amounts to.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from flwr.app import Message
from torch import nn
from torch.utils.data import Dataset

from fedge.config import RunConfig
from fedge.data.shared import Federation, client_split, federation
from fedge.data.stats import emd, emd_summary, float_entries, relative_distance
from fedge.tasks import Task, TrainConfig
from fedge.tasks.base import TrainReport, num_samples
from fedge.wire import EMD, LABEL_COUNTS, METRICS, NUM_EXAMPLES, STEPS, number


def _ok(replies: Iterable[Message]) -> list[Message]:
    return [m for m in replies if not m.has_error() and METRICS in m.content.metric_records]


def layer_of(key: str) -> str:
    """A state-dict key's layer: `conv1.weight` and `conv1.bias` both belong to `conv1`."""
    return key.rsplit(".", 1)[0] if "." in key else key


def weight_divergence(fedavg: Mapping[str, object], sgd: Mapping[str, object]) -> dict:
    """Zhao's ||w_FedAvg - w_SGD|| / ||w_SGD||, whole model and per layer."""
    fa, fs = float_entries(fedavg), float_entries(sgd)
    layers: dict[str, list[str]] = {}
    for key in fs:
        layers.setdefault(layer_of(key), []).append(key)
    per_layer = {
        name: relative_distance({k: fa[k] for k in keys}, {k: fs[k] for k in keys})
        for name, keys in layers.items()
    }
    return {"divergence": relative_distance(fa, fs), "divergence_layers": per_layer}


def label_skew(replies: Iterable[Message], reference: np.ndarray | None = None) -> dict[str, float]:
    """`emd_mean` (n_k-weighted) and `emd_max` of the clients that replied. A client that
    reported its label counts instead of an EMD (a device with its own data) is measured
    against `reference`, the label distribution of the server's data."""
    emds, sizes = [], []
    for reply in _ok(replies):
        r = reply.content.metric_records[METRICS]
        if EMD in r:
            emds.append(number(r, EMD))
        elif LABEL_COUNTS in r and reference is not None:
            emds.append(counts_emd(np.asarray(r[LABEL_COUNTS], float), reference))
        else:
            continue
        sizes.append(number(r, NUM_EXAMPLES))
    return emd_summary(emds, sizes)


def counts_emd(counts: np.ndarray, reference: np.ndarray) -> float:
    """Zhao's EMD of label counts against a reference distribution (the shorter padded)."""
    size = max(len(counts), len(reference))
    p_k = np.pad(counts, (0, size - len(counts))) / max(counts.sum(), 1.0)
    return emd(p_k, np.pad(reference, (0, size - len(reference))))


def client_drift(drift: Sequence[float], num_examples: Sequence[float]) -> dict[str, float]:
    """`drift_mean` (n_k-weighted) and `drift_max` of the round's ||w_k - w_t|| / ||w_t||,
    one per accepted reply (`relative_distance`, taken by the server's update check)."""
    if not len(drift):
        return {}
    d, n = np.asarray(drift, float), np.asarray(num_examples, float)
    return {"drift_mean": float((d * n).sum() / n.sum()), "drift_max": float(d.max())}


class ShadowSGD:
    """Centralized SGD on the pooled client data, run alongside federated training.

    Each round it takes as many SGD steps as a client took (the round's mean), with the
    same batch size, learning rate schedule and momentum, from the same initial weights.
    """

    def __init__(self, task: Task, model: nn.Module, data: Dataset, train: TrainConfig) -> None:
        self.task, self.data, self.train = task, data, train
        self.model = copy.deepcopy(model)

    def step(self, server_round: int, steps: int, lr: float) -> dict[str, torch.Tensor]:
        """Advance by `steps` SGD steps at `lr`; return the shadow model's state."""
        if steps > 0:
            per_epoch = -(-num_samples(self.data) // self.train.batch_size)  # ceil
            cfg = dataclasses.replace(
                self.train,
                epochs=-(-steps // max(per_epoch, 1)),
                max_steps=steps,
                lr=lr,
                seed=self.train.seed * 7919 + server_round,
                grad_hooks=[],
            )
            self.task.train(self.model, self.data, cfg)
        return self.model.state_dict()


def fedavg_round_steps(replies: Iterable[Message]) -> int:
    """The SGD steps a round of FedAvg took: the n_k-weighted mean of the clients' steps
    (Zhao: T local steps <-> T SGD steps; FedAvg weights client k by n_k, so do we)."""
    rows = [m.content.metric_records[METRICS] for m in _ok(replies)]
    if not rows:
        return 0
    weights = [number(r, NUM_EXAMPLES) for r in rows]
    return round(float(np.average([number(r, STEPS) for r in rows], weights=weights)))


def fedavg_steps(sizes: Sequence[int], batch_size: int, epochs: int) -> int:
    """The SGD steps one FedAvg round amounts to: client k takes ceil(n_k / B) * E steps and
    FedAvg weights its update by n_k, so the n_k-weighted mean (clients of unequal size,
    as under Dirichlet splits, make it larger than the plain mean)."""
    n = np.asarray(sizes, dtype=np.float64)
    if len(n) == 0 or n.sum() <= 0 or batch_size < 1 or epochs < 1:
        raise ValueError(
            f"need clients with data, B >= 1 and E >= 1; got {n}, B={batch_size}, E={epochs}"
        )
    steps = np.ceil(n / batch_size) * epochs
    return int(round(float((steps * n).sum() / n.sum())))


def sgd_replicas(
    task: Task,
    model: nn.Module,
    data: Dataset,
    train: TrainConfig,
    schedule: Sequence[tuple[int, float]],
    seeds: Sequence[int],
) -> list[list[dict[str, np.ndarray]]]:
    """Centralized SGD from `model`'s weights once per seed (data order), following
    `schedule` = [(steps, lr) for each round]; each replica's state after every round.

    Several replicas give the expected SGD trajectory (their mean) and its own noise
    (their spread): with few small-batch steps one SGD run is as far from another as
    from FedAvg, and the divergence non-IID data causes is hidden under that noise.
    """
    replicas = []
    for seed in seeds:
        shadow = ShadowSGD(task, model, data, dataclasses.replace(train, seed=seed))
        replicas.append(
            [
                dict(float_entries(shadow.step(r, steps, lr)))
                for r, (steps, lr) in enumerate(schedule, 1)
            ]
        )
    return replicas


def mean_state(states: Sequence[Mapping[str, object]]) -> dict[str, np.ndarray]:
    """The element-wise mean of several models' floating-point entries."""
    if not states:
        raise ValueError("mean_state needs at least one state")
    floats = [float_entries(s) for s in states]
    return {k: np.mean([f[k] for f in floats], axis=0) for k in floats[0]}


def sgd_noise(states: Sequence[Mapping[str, object]]) -> float:
    """Mean pairwise ||w_a - w_b|| / ||mean w|| of SGD replicas: the divergence that
    data order alone produces, the floor under any measured weight divergence."""
    if len(states) < 2:
        raise ValueError("sgd_noise needs at least two replicas")
    ref = mean_state(states)
    den = np.sqrt(sum(float((v**2).sum()) for v in ref.values()))
    floats = [float_entries(s) for s in states]
    pairs = [
        np.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in ref)) / den
        for i, a in enumerate(floats)
        for b in floats[i + 1 :]
    ]
    return float(np.mean(pairs))


def run_federation(task: Task, cfg: RunConfig) -> Federation:
    """The clients' partitions and G, by the same function the clients call."""
    return federation(
        task.train_labels(),
        cfg.num_clients,
        cfg.partition,
        cfg.seed,
        task.train_groups(),
        cfg.shared_fraction,
    )


def local_sgd(cfg: RunConfig, epochs: int) -> TrainConfig:
    """The clients' optimizer settings, for server-side training (warm-up, shadow SGD)."""
    return TrainConfig(
        epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum, seed=cfg.seed
    )


def warm_up(task: Task, model: nn.Module, cfg: RunConfig, fed: Federation) -> TrainReport:
    """Zhao et al.'s warm-up: train the initial global model on the shared subset G."""
    return task.train(model, task.train_dataset(fed.shared), local_sgd(cfg, cfg.warmup_epochs))


def shadow_sgd(task: Task, model: nn.Module, cfg: RunConfig, fed: Federation) -> ShadowSGD:
    """Centralized SGD on every client's training data pooled (for weight divergence)."""
    pooled = [
        client_split(fed, pid, cfg.seed, cfg.shared_per_client)[0] for pid in range(cfg.num_clients)
    ]
    data = task.train_dataset(np.concatenate(pooled))
    return ShadowSGD(task, model, data, local_sgd(cfg, cfg.local_epochs))
