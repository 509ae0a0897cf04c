"""Per-round checkpoints, and resuming a run from the last round that is intact on disk.

Each round the server writes, each file atomically and in this order, the strategy's state
(`state/strategy_NNN.pkl`: FedAdam's moments, SCAFFOLD's control variate, the DP
accountant...), the global model (`checkpoints/round_NNN.pt`, a torch state_dict) and then
`history.json`, which commits the round. A server killed at any point therefore leaves a
history whose every round has its files; a file damaged later (a truncated copy, a full
disk) makes `resume_point` fall back to the round before, which is then run again.
"""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedge.errors import ConfigError
from fedge.files import atomic_write_bytes

log = logging.getLogger("fedge")
KEEP_STRATEGY_STATES = 2  # older strategy states are deleted; model checkpoints are all kept


def model_path(out: Path, server_round: int) -> Path:
    return out / "checkpoints" / f"round_{server_round:03d}.pt"


def strategy_path(out: Path, server_round: int) -> Path:
    return out / "state" / f"strategy_{server_round:03d}.pkl"


def save_round(out: Path, server_round: int, model: nn.Module, strategy: Strategy) -> None:
    """The strategy's state, then the whole global model (frozen weights included)."""
    try:
        state = pickle.dumps(strategy)
    except Exception as exc:  # a strategy holding a lambda or a socket cannot be pickled
        log.warning("strategy state not saved (%s): --resume will restart it fresh", exc)
        state = b""
    atomic_write_bytes(strategy_path(out, server_round), state)
    stale = strategy_path(out, server_round - KEEP_STRATEGY_STATES)
    stale.unlink(missing_ok=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(model_path(out, server_round), buf.getvalue())


def load_model(path: Path, model: nn.Module) -> None:
    """Load the torch state_dict at `path` into `model`; ConfigError names the file when it is
    missing, damaged or another model's."""
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise ConfigError(f"{path} is missing or damaged ({type(exc).__name__})") from None


def load_round(out: Path, server_round: int, model: nn.Module) -> Strategy | None:
    """Load round `server_round`'s model into `model`; return its strategy (None: not saved).

    Raises ValueError naming the file when either file is missing or damaged.
    """
    load_model(model_path(out, server_round), model)
    path = strategy_path(out, server_round)
    try:
        data = path.read_bytes()
        return pickle.loads(data) if data else None
    except Exception as exc:
        raise ConfigError(f"{path} is missing or damaged ({type(exc).__name__})") from None


def resume_point(
    out: Path, model: nn.Module, records: list[dict[str, Any]]
) -> tuple[int, Strategy | None, list[dict[str, Any]]]:
    """The last round of `records` whose files load (into `model`), its strategy, and the
    records up to it. Round 0 (start afresh) when no round is intact."""
    for i in range(len(records) - 1, -1, -1):
        server_round = int(records[i]["round"])
        try:
            strategy = load_round(out, server_round, model)
        except ValueError as exc:
            log.warning("cannot resume from round %d: %s", server_round, exc)
            print(f"fedge: {exc}; trying the round before", flush=True)
            continue
        return server_round, strategy, records[: i + 1]
    return 0, None, []
