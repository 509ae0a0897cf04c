"""Label distributions and how far a client's is from the population's (Zhao et al. 2018).

Zhao et al. measure label skew with the earth mover's distance between a client's label
distribution p_k and the population's p: EMD_k = sum_i |p_k(i) - p(i)| (their definition,
twice the total variation). A 1-class client of 10 balanced classes has EMD 1.8, a 2-class
client 1.6, an IID one about 0. Their weight divergence grows with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch


def label_distribution(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """p(i): the fraction of samples with label i, for i in 0..num_classes-1."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("label_distribution of no samples is undefined; the client holds no data")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}"
        )
    return np.bincount(labels, minlength=num_classes) / len(labels)


def emd(p_k: np.ndarray, p: np.ndarray) -> float:
    """Zhao's EMD: sum_i |p_k(i) - p(i)|, in [0, 2]."""
    p_k, p = np.asarray(p_k, dtype=np.float64), np.asarray(p, dtype=np.float64)
    if p_k.shape != p.shape:
        raise ValueError(f"distributions differ in size: {p_k.shape} vs {p.shape}")
    return float(np.abs(p_k - p).sum())


def tv(p_k: np.ndarray, p: np.ndarray) -> float:
    """Total variation distance, the EMD under a 0/1 ground metric: emd / 2, in [0, 1]."""
    return emd(p_k, p) / 2


def client_emds(labels: np.ndarray, clients: Sequence[np.ndarray]) -> np.ndarray:
    """EMD of each client's samples (indices into `labels`) against all of `labels`."""
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = int(labels.max()) + 1
    p = label_distribution(labels, num_classes)
    return np.array([emd(label_distribution(labels[c], num_classes), p) for c in clients])


def emd_summary(emds: Sequence[float], sizes: Sequence[float]) -> dict[str, float]:
    """`emd_mean` (weighted by client size n_k) and `emd_max` over a set of clients."""
    e, n = np.asarray(emds, dtype=np.float64), np.asarray(sizes, dtype=np.float64)
    if len(e) == 0 or n.sum() <= 0:
        return {}
    return {"emd_mean": float((e * n).sum() / n.sum()), "emd_max": float(e.max())}


def float_entries(state: Mapping[str, object]) -> dict[str, np.ndarray]:
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
    fa, fb = float_entries(a), float_entries(b)
    keys = [k for k in fb if k in fa]  # FedAvg turns integer buffers (BatchNorm counts) into floats
    num = sum(float(((fa[k] - fb[k]) ** 2).sum()) for k in keys)
    den = sum(float((fb[k] ** 2).sum()) for k in keys)
    return float(np.sqrt(num / den)) if den > 0 else float("nan")
