"""Client-level differential privacy: clients clip their update, the server adds noise.

This is Flower's `DifferentialPrivacyClientSideFixedClipping` wrapper (McMahan et al. 2018,
"Learning Differentially Private Recurrent Language Models") with Flower's RDP accountant,
so every round's epsilon can be reported. The accountant counts each round as one Gaussian
release without amplification by sampling (the conservative bound Flower supports) and needs
uniform FedAvg weights, which fedge's clients give by reporting `dp-weight` = 1.
"""

from __future__ import annotations

import math

import torch
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy

from fedge.compat import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from fedge.errors import ConfigError

__all__ = ["clip_update", "privacy_spent", "with_dp"]


def with_dp(
    strategy: Strategy,
    noise_multiplier: float,
    clipping_norm: float,
    num_sampled_clients: int,
    population: int,
    delta: float,
) -> DifferentialPrivacyClientSideFixedClipping:
    """Wrap a FedAvg-family strategy (built with `weighted_by_key=DP_WEIGHT`) for DP."""
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    try:
        return DifferentialPrivacyClientSideFixedClipping(
            strategy, noise_multiplier, clipping_norm, num_sampled_clients, accountant=accountant
        )
    except ValueError as exc:
        raise ConfigError(
            f"differential privacy (--dp-noise) cannot wrap {type(strategy).__name__}: {exc} "
            "Use --strategy fedavg or fedprox."
        ) from None


def privacy_spent(strategy: Strategy) -> dict[str, float]:
    """`dp_epsilon` and `dp_delta` spent so far, or {} for a strategy without DP."""
    spent_fn = getattr(strategy, "privacy_spent", None)
    spent = spent_fn() if spent_fn else None
    if spent is None:
        return {}
    return {"dp_epsilon": float(spent.epsilon), "dp_delta": float(spent.delta)}


def clip_update(
    state: dict[str, torch.Tensor], sent: dict[str, torch.Tensor], clipping_norm: float
) -> dict[str, torch.Tensor]:
    """Scale the update w_k - w_t of the float tensors to L2 norm at most `clipping_norm`."""
    floats = [k for k, v in state.items() if v.is_floating_point()]
    norm = math.sqrt(sum(float(((state[k] - sent[k]).double() ** 2).sum()) for k in floats))
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    out = dict(state)
    for k in floats:
        out[k] = (sent[k] + scale * (state[k] - sent[k])).to(state[k].dtype)
    return out
