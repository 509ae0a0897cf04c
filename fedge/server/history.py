"""Per-round records: what the clients reported, what the server measured, saved as it goes.

`history.json` is rewritten atomically after every round, so a run that dies keeps every
completed round; the plot is redrawn beside it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message

NUM_EXAMPLES = "num-examples"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _metrics(replies: Iterable[Message]) -> tuple[list[dict[str, float]], int]:
    """Metric dicts of the successful replies, and the number of failed ones."""
    ok, failed = [], 0
    for msg in replies:
        if msg.has_error() or "metrics" not in msg.content.metric_records:
            failed += 1
        else:
            ok.append(dict(msg.content.metric_records["metrics"]))
    return ok, failed


def _weighted(rows: list[dict[str, float]], key: str) -> float:
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
    seconds = [r.get("train_seconds", 0.0) for r in rows]
    out.update(
        train_loss=_weighted(rows, "train_loss"),
        train_seconds_mean=sum(seconds) / len(seconds),
        train_seconds_max=max(seconds),
        peak_rss_mb_max=max(r.get("peak_rss_mb", 0.0) for r in rows),
        examples_seen=int(sum(r.get("examples_seen", 0) for r in rows)),
        update_bytes=int(sum(r.get("update_bytes", 0) for r in rows)),
        update_bytes_mean=sum(r.get("update_bytes", 0) for r in rows) / len(rows),
        stopped_early=int(sum(r.get("stopped_early", 0) for r in rows)),
    )
    out.update(device_times(replies))
    return out


DEVICE_TIMES = ("wait_seconds", "first_compute_seconds", "upload_seconds")


def device_times(replies: list[Message]) -> dict[str, Any]:
    """Where a device's time went (means and maxima of `DEVICE_TIMES`), and
    `device_seconds_max` with its `slowest_node`: the device that held the round up."""
    ok = [m for m in replies if not m.has_error() and "metrics" in m.content.metric_records]
    rows = [(m.metadata.src_node_id, m.content.metric_records["metrics"]) for m in ok]
    out: dict[str, Any] = {}
    for key in DEVICE_TIMES:
        values = [float(r[key]) for _, r in rows if key in r]
        if values:
            out[f"{key}_mean"], out[f"{key}_max"] = sum(values) / len(values), max(values)
    timed = [(float(r["device_seconds"]), node) for node, r in rows if "device_seconds" in r]
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

    def __init__(self, out: str | Path, metric: str = "accuracy") -> None:
        self.out = Path(out)
        self.metric = metric
        self.records: list[dict[str, Any]] = []

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
        raise ValueError(f"{path} is damaged ({exc}); rerun or restore it") from None
