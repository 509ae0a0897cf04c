"""FedProx's Synthetic(alpha, beta): one logistic-regression device model per client, any
number of clients.

Li et al. 2020, "Federated Optimization in Heterogeneous Networks", Section 5.1: device k
labels its inputs with its own model, y = argmax(softmax(W_k x + b_k)), x in R^60, 10 classes,
W_k ~ N(u_k, 1), b_k ~ N(u_k, 1), u_k ~ N(0, alpha); x_k ~ N(v_k, Sigma) with Sigma diagonal,
Sigma_jj = j^-1.2, v_k ~ N(B_k, 1), B_k ~ N(0, beta). alpha controls how much the local models
differ, beta how much the local inputs differ. Device sizes follow a power law: as in the
paper's data script (FedProx's `generate_synthetic.py`), n_k = floor(lognormal(4, 2)) + 50
and the N(mean, s) of the paper are normal draws with standard deviation s; each device
keeps 90% of its samples for training and 10% for evaluation, as that script does.

Device k's data is drawn only when it is needed, from a generator seeded by (seed, k), so a
population of 10^5 or 10^6 clients costs nothing until sampled. The server's test set is the
held-out 10% of devices 0..test_devices-1. With one model per device (the paper's
definition), a global model cannot generalise to devices it never saw: a large population
learns with `models` M, device k labelling with device (k mod M)'s model.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedge.tasks.base import OwnData, Task, classification_sums

DIM, CLASSES = 60, 10
TRAIN_FRACTION = 0.9  # of each device's samples; the rest is its evaluation split


@functools.lru_cache(maxsize=64)
def device_data(
    seed: int, k: int, alpha: float, beta: float, iid: bool, models: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of device k: float32 inputs (n_k, 60) and int64 labels (n_k,). With `models`
    M > 0, device k follows the device model (W, b, v) of device k mod M."""
    rng = np.random.default_rng([seed, k % models if models else k])  # the device's model
    samples = np.random.default_rng([seed, k, 1])  # the device's size and inputs
    n = int(samples.lognormal(4, 2)) + 50
    if iid:  # the paper's IID variant: one global model, every device's inputs alike
        shared = np.random.default_rng([seed, 1 << 40])
        w, b = shared.normal(0, 1, (DIM, CLASSES)), shared.normal(0, 1, CLASSES)
        mean_x = np.zeros(DIM)
    else:
        u, big_b = rng.normal(0, alpha), rng.normal(0, beta)
        mean_x = rng.normal(big_b, 1, DIM)
        w, b = rng.normal(u, 1, (DIM, CLASSES)), rng.normal(u, 1, CLASSES)
    scale = np.arange(1, DIM + 1, dtype=np.float64) ** -0.6  # sqrt of Sigma_jj = j^-1.2
    x = mean_x + samples.standard_normal((n, DIM)) * scale
    y = np.argmax(x @ w + b, axis=1)  # argmax of softmax is argmax of the logits
    return x.astype(np.float32), y.astype(np.int64)


class SyntheticTask(Task):
    """Synthetic(alpha, beta) of FedProx: multinomial logistic regression on 60-dim inputs.

    Options: `alpha` and `beta` (heterogeneity of models and inputs; FedProx's settings are
    (0, 0), (0.5, 0.5), (1, 1)), `iid` (the paper's IID variant), `test_devices` (devices
    whose held-out split is the server's test set), `models` (0: one model per device, the
    paper's definition; M > 0: device k draws its own samples from device k mod M's model, so
    a population of any size shares M learnable distributions, all in the test set when
    test_devices >= M).
    """

    name = "synthetic"

    def __init__(
        self,
        data_dir: str | None = None,
        seed: int = 0,
        alpha: float = 1.0,
        beta: float = 1.0,
        iid: bool = False,
        test_devices: int = 100,
        models: int = 0,
        **options: object,
    ) -> None:
        super().__init__(data_dir, seed, **options)
        if data_dir:
            raise ValueError("synthetic makes its own data; remove --data-dir")
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        if int(test_devices) < 1:
            raise ValueError(f"test_devices must be >= 1, got {test_devices}")
        if int(models) < 0:
            raise ValueError(f"models must be >= 0, got {models}")
        self.models = int(models)
        self.alpha, self.beta, self.iid = float(alpha), float(beta), bool(iid)
        self.test_devices = int(test_devices)
        held_out = [self._split(k)[1] for k in range(self.test_devices)]
        self._test = (
            torch.from_numpy(np.concatenate([x for x, _ in held_out])),
            torch.from_numpy(np.concatenate([y for _, y in held_out])),
        )

    def _split(self, k: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        x, y = device_data(self.seed, k, self.alpha, self.beta, self.iid, self.models)
        cut = int(TRAIN_FRACTION * len(y))
        return (x[:cut], y[:cut]), (x[cut:], y[cut:])

    def client_data(self, partition_id: int) -> OwnData:
        (x, y), (xe, ye) = self._split(partition_id)
        return OwnData(
            TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
            TensorDataset(torch.from_numpy(xe), torch.from_numpy(ye)),
            np.bincount(y, minlength=CLASSES).tolist(),
        )

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return nn.Linear(DIM, CLASSES)

    def train_labels(self) -> np.ndarray:
        """The test set's labels: the reference label distribution (no pool to partition)."""
        return self._test[1].numpy()

    def train_dataset(self, indices: np.ndarray | None = None) -> Dataset:
        raise ValueError(
            "synthetic has no training pool to cut: each client's data is its own device's"
        )

    def test_dataset(self) -> Dataset:
        return TensorDataset(*self._test)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def eval_sums(
        self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
    ) -> dict[str, float]:
        x, y = batch
        return classification_sums(model(x), y)
