"""What non-IID data does to a round (Zhao et al. 2018): label skew, client drift and
weight divergence from centralized SGD.

- `label_skew`: n_k-weighted mean and max EMD of the clients that trained this round (each
  client reports the EMD of its training data, G included, as the metric `emd`).
- `client_drift`: ||w_k - w_t|| / ||w_t|| of each reply against the model it was sent (the
  server measures it once per reply while validating the update).
- `ShadowSGD` + `weight_divergence`: a centralized SGD run on the pooled client data from
  the same initial weights; as in Zhao et al.'s analysis, m rounds of T local steps are
  matched with mT centralized steps (same batch size, learning rate and momentum);
  ||w_FedAvg - w_SGD|| / ||w_SGD|| per layer and for the whole model (simulation only).
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

from fedge.client.app import LABEL_COUNTS
from fedge.data.stats import emd, emd_summary
from fedge.tasks import Task, TrainConfig

NUM_EXAMPLES = "num-examples"


def _ok(replies: Iterable[Message]) -> list[Message]:
    return [m for m in replies if not m.has_error() and "metrics" in m.content.metric_records]


def _floats(state: Mapping[str, object]) -> dict[str, np.ndarray]:
    """The floating-point entries of a state dict or ArrayRecord, as float64 arrays."""
    out = {}
    for key, value in state.items():
        arr = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        if isinstance(value, torch.Tensor):
            arr = value.detach().cpu().numpy()
        if np.issubdtype(arr.dtype, np.floating):
            out[key] = arr.astype(np.float64)
    return out


def relative_distance(a: Mapping[str, object], b: Mapping[str, object]) -> float:
    """||a - b|| / ||b|| over all floating-point entries."""
    fa, fb = _floats(a), _floats(b)
    keys = [k for k in fb if k in fa]  # FedAvg turns integer buffers (BatchNorm counts) into floats
    num = sum(float(((fa[k] - fb[k]) ** 2).sum()) for k in keys)
    den = sum(float((fb[k] ** 2).sum()) for k in keys)
    return float(np.sqrt(num / den)) if den > 0 else float("nan")


def layer_of(key: str) -> str:
    """A state-dict key's layer: `conv1.weight` and `conv1.bias` both belong to `conv1`."""
    return key.rsplit(".", 1)[0] if "." in key else key


def weight_divergence(fedavg: Mapping[str, object], sgd: Mapping[str, object]) -> dict:
    """Zhao's ||w_FedAvg - w_SGD|| / ||w_SGD||, whole model and per layer."""
    fa, fs = _floats(fedavg), _floats(sgd)
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
    reported its label counts instead of an EMD is measured against `reference` (the label
    distribution of the server's data)."""
    emds, sizes = [], []
    for reply in _ok(replies):
        r = reply.content["metrics"]
        if "emd" in r:
            emds.append(float(r["emd"]))
        elif LABEL_COUNTS in r and reference is not None:
            emds.append(counts_emd(np.asarray(r[LABEL_COUNTS], float), reference))
        else:
            continue
        sizes.append(float(r[NUM_EXAMPLES]))
    return emd_summary(emds, sizes)


def counts_emd(counts: np.ndarray, reference: np.ndarray) -> float:
    """Zhao's EMD of label counts against a reference distribution (shorter one padded)."""
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
            per_epoch = -(-len(self.data) // self.train.batch_size)  # ceil
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


def fedavg_steps(sizes: Sequence[int], batch_size: int, epochs: int) -> int:
    """The SGD steps one FedAvg round amounts to: client k takes ceil(n_k / B) * E steps and
    FedAvg weights its update by n_k, so the n_k-weighted mean (clients of unequal size,
    as under Dirichlet splits, make it larger than the plain mean)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if len(sizes) == 0 or sizes.sum() <= 0 or batch_size < 1 or epochs < 1:
        raise ValueError(
            f"need clients with data, B >= 1 and E >= 1; got {sizes}, B={batch_size}, E={epochs}"
        )
    steps = np.ceil(sizes / batch_size) * epochs
    return int(round(float((steps * sizes).sum() / sizes.sum())))


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
            [dict(_floats(shadow.step(r, steps, lr))) for r, (steps, lr) in enumerate(schedule, 1)]
        )
    return replicas


def mean_state(states: Sequence[Mapping[str, object]]) -> dict[str, np.ndarray]:
    """The element-wise mean of several models' floating-point entries."""
    if not states:
        raise ValueError("mean_state needs at least one state")
    floats = [_floats(s) for s in states]
    return {k: sum(f[k] for f in floats) / len(floats) for k in floats[0]}


def sgd_noise(states: Sequence[Mapping[str, object]]) -> float:
    """Mean pairwise ||w_a - w_b|| / ||mean w|| of SGD replicas: the divergence that
    data order alone produces, the floor under any measured weight divergence."""
    if len(states) < 2:
        raise ValueError("sgd_noise needs at least two replicas")
    ref = mean_state(states)
    den = np.sqrt(sum(float((v**2).sum()) for v in ref.values()))
    floats = [_floats(s) for s in states]
    pairs = [
        np.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in ref)) / den
        for i, a in enumerate(floats)
        for b in floats[i + 1 :]
    ]
    return float(np.mean(pairs))
