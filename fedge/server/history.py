"""Per-round records: what the clients reported, what the server measured, saved as it goes.

`history.json` is rewritten atomically after every round, so a run that dies keeps every
completed round; the plot is redrawn beside it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message

from fedge.data.divergence import label_skew
from fedge.errors import ConfigError
from fedge.files import atomic_write_bytes
from fedge.server.observer import RoundReplies
from fedge.wire import (
    DEVICE_SECONDS,
    EXAMPLES_SEEN,
    FIRST_COMPUTE_SECONDS,
    METRICS,
    NUM_EXAMPLES,
    PEAK_RSS_MB,
    STOPPED_EARLY,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    UPDATE_BYTES,
    UPLOAD_SECONDS,
    WAIT_SECONDS,
    number,
)


def _metrics(replies: Iterable[Message]) -> tuple[list[dict[str, Any]], int]:
    """Metric dicts of the successful replies, and the number of failed ones."""
    ok, failed = [], 0
    for msg in replies:
        if msg.has_error() or METRICS not in msg.content.metric_records:
            failed += 1
        else:
            ok.append(dict(msg.content.metric_records[METRICS]))
    return ok, failed


def _weighted(rows: list[dict[str, Any]], key: str) -> float:
    total = sum(r.get(NUM_EXAMPLES, 0) for r in rows if key in r)
    if total <= 0:
        return math.nan
    return sum(r[key] * r.get(NUM_EXAMPLES, 0) for r in rows if key in r) / total


def failure_reasons(replies: Iterable[Message]) -> list[str]:
    """`node N: why` for every reply that carries an error."""
    return [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in replies if m.has_error()]


def summarize_train(replies: Iterable[Message]) -> dict[str, Any]:
    """Aggregate the device metrics of a training round (means, maxima and totals)."""
    replies = list(replies)
    rows, failed = _metrics(replies)
    out: dict[str, Any] = {
        "num_clients": len(rows),
        "failures": failed,
        "failure_reasons": failure_reasons(replies),
    }
    if not rows:
        return out
    seconds = [r.get(TRAIN_SECONDS, 0.0) for r in rows]
    out.update(
        train_loss=_weighted(rows, TRAIN_LOSS),
        train_seconds_mean=sum(seconds) / len(seconds),
        train_seconds_max=max(seconds),
        peak_rss_mb_max=max(r.get(PEAK_RSS_MB, 0.0) for r in rows),
        examples_seen=int(sum(r.get(EXAMPLES_SEEN, 0) for r in rows)),
        update_bytes=int(sum(r.get(UPDATE_BYTES, 0) for r in rows)),
        update_bytes_mean=sum(r.get(UPDATE_BYTES, 0) for r in rows) / len(rows),
        stopped_early=int(sum(r.get(STOPPED_EARLY, 0) for r in rows)),
    )
    out.update(device_times(replies))
    return out


DEVICE_TIMES = (WAIT_SECONDS, FIRST_COMPUTE_SECONDS, UPLOAD_SECONDS)


def device_times(replies: list[Message]) -> dict[str, Any]:
    """Where a device's time went (means and maxima of `DEVICE_TIMES`), and
    `device_seconds_max` with its `slowest_node`: the device that held the round up."""
    ok = [m for m in replies if not m.has_error() and METRICS in m.content.metric_records]
    rows = [(m.metadata.src_node_id, m.content.metric_records[METRICS]) for m in ok]
    out: dict[str, Any] = {}
    for key in DEVICE_TIMES:
        values = [number(r, key) for _, r in rows if key in r]
        if values:
            out[f"{key}_mean"], out[f"{key}_max"] = sum(values) / len(values), max(values)
    timed = [(number(r, DEVICE_SECONDS), node) for node, r in rows if DEVICE_SECONDS in r]
    if timed:
        out["device_seconds_max"], out["slowest_node"] = max(timed)
    return out


def summarize_evaluate(replies: Iterable[Message]) -> dict[str, Any]:
    """Example-weighted federated evaluation metrics, prefixed `fed_`."""
    rows, failed = _metrics(replies)
    out: dict[str, Any] = {"fed_clients": len(rows), "fed_failures": failed}
    keys = {k for r in rows for k in r if k != NUM_EXAMPLES}
    out.update({f"fed_{k}": _weighted(rows, k) for k in sorted(keys)})
    return out


def _clean(value: Any) -> Any:
    """JSON has no NaN: write None for it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class History:
    """The run's per-round records, persisted into `out` after each round."""

    def __init__(
        self, out: str | Path, metric: str = "accuracy", labels: np.ndarray | None = None
    ) -> None:
        self.out = Path(out)
        self.metric = metric
        self.records: list[dict[str, Any]] = []
        # the server's label distribution: the reference of devices that report label counts
        self.reference = np.bincount(labels) / len(labels) if labels is not None else None

    def round_record(
        self,
        server_round: int,
        central: Mapping[str, Any],
        replies: RoundReplies,
        extra: dict[str, Any],
        seconds: float,
    ) -> dict[str, Any]:
        """One round's record: the central metrics, the clients' device metrics and
        failures (a node that never answered failed too), label skew, rejections and drift,
        `extra` (privacy spent, divergence), federated evaluation and the round's seconds."""
        train = summarize_train(replies.train)
        train["failures"] += replies.unanswered
        if replies.unanswered:
            train["failure_reasons"].append(f"{replies.unanswered} node(s) never answered")
        return {
            "round": server_round,
            **central,
            **train,
            **label_skew(replies.train, self.reference),
            "rejected": replies.rejected,
            **replies.drift,
            **replies.extra,
            **extra,
            **summarize_evaluate(replies.evaluate),
            "seconds": seconds,
        }

    def failed_rounds_in_a_row(self) -> int:
        """How many of the last rounds aggregated no update (no client trained successfully)."""
        count = 0
        for record in reversed(self.records):
            if record.get("num_clients", 0) > 0:
                break
            count += 1
        return count

    def append(self, record: dict[str, Any]) -> None:
        self.records.append({k: _clean(v) for k, v in record.items()})
        self.save()

    def save(self) -> None:
        data = json.dumps(self.records, indent=2).encode()
        atomic_write_bytes(self.out / "history.json", data)
        self.plot()

    def plot(self) -> None:
        """`history.png`: the headline metric and the loss by round."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.records]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
        for ax, key in ((ax1, self.metric), (ax2, "loss")):
            ax.plot(rounds, [r.get(key) for r in self.records], marker="o", label="centralized")
            fed = [r.get(f"fed_{key}") for r in self.records]
            if any(v is not None for v in fed):
                ax.plot(rounds, fed, marker="x", linestyle="--", label="federated")
            ax.set_xlabel("round")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        tmp = self.out / ".history.png.tmp"
        fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        os.replace(tmp, self.out / "history.png")


def load_history(out: str | Path) -> list[dict[str, Any]]:
    """Read a run's `history.json`; a clear error if it is missing or damaged."""
    path = Path(out) / "history.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: did the run finish a round?") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is damaged ({exc}); rerun or restore it") from None


def time_to_target(
    records: list[dict[str, Any]], metric: str, target: float, higher_is_better: bool = True
) -> dict[str, float] | None:
    """The first round whose `metric` reaches `target`: its round, its virtual time (where the
    run had a virtual clock) and the wall seconds the run had taken; None if none did."""
    wall = 0.0
    for record in records:
        wall += record.get("seconds") or 0.0
        value = record.get(metric)
        if value is None:
            continue
        if (value >= target) if higher_is_better else (value <= target):
            out = {"round": record["round"], "seconds": wall}
            if record.get("virtual_time") is not None:
                out["virtual_time"] = record["virtual_time"]
            return out
    return None
