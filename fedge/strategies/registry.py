"""Strategies by name: Flower's own, fedge's, and any Strategy subclass as `module:Class`.

Sampling arguments (how many clients train and evaluate, how many must be connected)
come from the run configuration; everything else comes from `strategy_options`, which
win over fedge's defaults.
"""

from __future__ import annotations

import inspect
from typing import Any

from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp import strategy as fl

from fedge.errors import ConfigError, did_you_mean
from fedge.plugins import load_object
from fedge.tasks import TrainConfig, TrainReport

# name -> (class or "module:Class", default options)
STRATEGIES: dict[str, tuple[Any, dict[str, Any]]] = {
    "fedavg": (fl.FedAvg, {}),
    "fedprox": (fl.FedProx, {"proximal_mu": 0.01}),
    "fedadam": (fl.FedAdam, {}),
    "fedyogi": (fl.FedYogi, {}),
    "fedadagrad": (fl.FedAdagrad, {}),
    "fedavgm": (fl.FedAvgM, {}),
    "fedmedian": (fl.FedMedian, {}),
    "fedtrimmedavg": (fl.FedTrimmedAvg, {}),
    "krum": (fl.Krum, {}),
    "multikrum": (fl.MultiKrum, {}),
    "bulyan": (fl.Bulyan, {}),
    "qfedavg": (fl.QFedAvg, {}),
    "scaffold": ("fedge.strategies.scaffold:Scaffold", {}),
    "fednova": ("fedge.strategies.fednova:FedNova", {}),
    "fedbuff": ("fedge.strategies.fedbuff:FedBuff", {}),
}

# config["algorithm"] a strategy sends -> the client half it needs ("module:Class")
CLIENT_ALGORITHMS: dict[str, str] = {
    "scaffold": "fedge.strategies.scaffold:ScaffoldClient",
    "fednova": "fedge.strategies.fednova:FedNovaClient",
}


class ClientAlgorithm:
    """The client half of a strategy, built fresh for each training instruction.

    `prepare` may add gradient hooks to the TrainConfig and read extra records of the
    instruction and the node's persistent `state`; `finish` returns extra ArrayRecords
    and metrics for the reply.
    """

    def prepare(self, model: Any, content: RecordDict, state: RecordDict, cfg: TrainConfig) -> None:
        """Called after the global model is loaded, before local training."""

    def finish(
        self, model: Any, report: TrainReport, state: RecordDict
    ) -> tuple[dict[str, ArrayRecord], dict[str, float]]:
        """Called after local training; returns (extra ArrayRecords, extra metrics)."""
        return {}, {}


def client_algorithm(name: str) -> ClientAlgorithm | None:
    """The client half for `config["algorithm"]`, or None for plain local training."""
    if not name:
        return None
    if name not in CLIENT_ALGORITHMS:
        raise ConfigError(
            f"the server asked for client algorithm {name!r}; this client knows "
            f"{sorted(CLIENT_ALGORITHMS)}: update fedge on the client"
        )
    return load_object(CLIENT_ALGORITHMS[name])()


def round_metrics(strategy: fl.Strategy) -> dict[str, Any]:
    """What a strategy reports for the round's history record (FedBuff: its virtual time
    and staleness; Oort: its preferred round time); {} for most strategies."""
    report = getattr(strategy, "round_metrics", None)
    return report() if report else {}


def strategy_class(name: str) -> type[fl.Strategy]:
    """The Strategy class for a registered name or a `module:Class` spec."""
    if name in STRATEGIES:
        cls = STRATEGIES[name][0]
    elif ":" in name:
        cls = load_object(name)
    else:
        raise ConfigError(
            f"unknown strategy {name!r}{did_you_mean(name, STRATEGIES)}; "
            f"choose one of {sorted(STRATEGIES)} or 'module:Class'"
        )
    if isinstance(cls, str):
        cls = load_object(cls)
    if not (isinstance(cls, type) and issubclass(cls, fl.Strategy)):
        raise ConfigError(f"{name!r} is not a flwr.serverapp.strategy.Strategy subclass")
    return cls


def build_strategy(
    name: str, options: dict[str, Any], sampling: dict[str, Any], lr: float = 0.05
) -> fl.Strategy:
    """Instantiate a strategy; sampling keys go only where the class accepts them."""
    cls = strategy_class(name)
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    defaults = dict(STRATEGIES.get(name, (None, {}))[1])
    if "client_learning_rate" in params:  # q-FedAvg needs the clients' learning rate
        defaults["client_learning_rate"] = lr
    kwargs = {k: v for k, v in sampling.items() if takes_any or k in params}
    kwargs.update(defaults)
    kwargs.update(options)
    unknown = [k for k in options if not takes_any and k not in params]
    if unknown:
        allowed = sorted(k for k in params if k != "self")
        raise ConfigError(f"strategy {name!r} has no option(s) {unknown}; allowed: {allowed}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # Flower checks its options' values
        raise ConfigError(f"strategy {name!r}: {exc}") from exc
