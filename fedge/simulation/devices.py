"""Device profiles of a simulated population: compute speed, bandwidth, memory, availability.

A population is generated (`DeviceModel`, seeded) or read from a trace file. Speeds follow
FedScale's model (Lai et al. 2022): a device's `computation` is its latency in ms per sample
(inference), training costs `compute_factor` (FedScale's augmentation factor, 3: the backward
pass is about twice the forward) times that per sample, and its bandwidth is in kbit/s. The
generated model draws both lognormally, as FedScale fits its AI-Benchmark and MobiPerf
traces, and gives each device one online window a day (a diurnal, night-time charging
pattern, as in FedScale's client behaviour traces of 136k users: devices train when idle,
charging and on Wi-Fi).

Trace files (device i of the file is partition i; rows sorted by `client_id` when present):
- CSV with a header: `computation` (ms per sample), `communication` (kbit/s both ways) or
  `down_kbps` and `up_kbps`; optional `memory_mb`; optional availability as `active` and
  `inactive` (space-separated seconds at which the device comes online and goes offline) with
  `finish_time` (the trace's period in seconds), FedScale's `client_behave_trace` fields.
- JSON: FedScale's `client_device_capacity` as a JSON object `{client_id: {"computation": ms,
  "communication": kbps}}` (or a list of such records); each record may carry the behave
  trace's `active`, `inactive` and `finish_time` too. FedScale ships these as pickles, which
  fedge does not unpickle: convert them once with `json.dump(pickle.load(f), out)`.
A device without availability fields is always online.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedge.errors import ConfigError, did_you_mean

DAY = 86_400.0
GENERATED = "generated"  # `--devices generated`: draw the population from `DeviceModel`


@dataclass(frozen=True)
class DeviceModel:
    """Parameters of a generated population (each a `--device-option KEY=VALUE`).

    speed_ms, speed_sigma: median and log-sd of the lognormal ms per sample (inference).
    compute_factor: training cost per sample in units of inference (FedScale: 3).
    down_kbps, up_kbps, bandwidth_sigma: medians and log-sd of the lognormal bandwidths.
    memory_mb, memory_sigma: median and log-sd of device memory; a client whose process
    needed more (its reported peak memory) fails the round as out of memory.
    online_hours: mean length of a device's daily online window (uniform in [0.5, 1.5] x it);
    start_hour, start_sd_hours: windows start around this hour, normally spread;
    always_online: fraction of devices online all the time (0.0 to 1.0).
    """

    speed_ms: float = 20.0
    speed_sigma: float = 0.8
    compute_factor: float = 3.0
    down_kbps: float = 20_000.0
    up_kbps: float = 5_000.0
    bandwidth_sigma: float = 1.0
    memory_mb: float = 4096.0
    memory_sigma: float = 0.4
    online_hours: float = 8.0
    start_hour: float = 22.0
    start_sd_hours: float = 3.0
    always_online: float = 0.0

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> DeviceModel:
        """Build from `device_options`; an unknown key or a bad value names the option."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key, value in options.items():
            if key not in known:
                raise ConfigError(
                    f"device_options: unknown option {key!r}{did_you_mean(key, known)}; "
                    f"known: {', '.join(sorted(known))}"
                )
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"device_options: {key} must be a number, got {value!r}")
        model = cls(**{k: float(v) for k, v in options.items()})
        positive = ("speed_ms", "compute_factor", "down_kbps", "up_kbps", "memory_mb")
        for name in positive:
            if getattr(model, name) <= 0:
                raise ConfigError(f"device_options: {name} must be > 0, got {getattr(model, name)}")
        if not 0 < model.online_hours <= 24:
            raise ConfigError(
                f"device_options: online_hours must be in (0, 24], got {model.online_hours}"
            )
        if not 0 <= model.always_online <= 1:
            raise ConfigError(
                f"device_options: always_online must be in [0, 1], got {model.always_online}"
            )
        return model


@dataclass
class Devices:
    """Profiles of `len(speed_ms)` devices (index = partition id) and their online windows.

    Device d is online at time t when (t - start) mod period < length for one of its windows
    (window arrays: `window_device`, `window_start`, `window_length`); a device without a
    window is always online.
    """

    speed_ms: np.ndarray  # ms per sample, inference
    down_kbps: np.ndarray
    up_kbps: np.ndarray
    memory_mb: np.ndarray
    period: np.ndarray  # seconds after which a device's availability repeats
    window_device: np.ndarray
    window_start: np.ndarray
    window_length: np.ndarray
    compute_factor: float = 3.0

    def __len__(self) -> int:
        return len(self.speed_ms)

    def online(self, t: float) -> np.ndarray:
        """A boolean per device: online at virtual time t."""
        d = self.window_device
        hit = np.mod(t - self.window_start, self.period[d]) < self.window_length
        on = np.bincount(d[hit], minlength=len(self)) > 0
        on |= np.bincount(d, minlength=len(self)) == 0  # no window: always online
        return on

    def next_online(self, t: float, count: int, step: float = 60.0) -> float:
        """The first time >= t (on a `step` grid) with at least `count` devices online."""
        horizon = float(self.period.max()) if len(self.window_device) else 0.0
        probe = t
        while probe <= t + horizon:
            if int(self.online(probe).sum()) >= count:
                return probe
            probe += step
        raise ConfigError(
            f"devices: never {count} devices online at once (at most "
            f"{self.max_online(step)} of {len(self)}); lower clients_per_round or over_select"
        )

    def max_online(self, step: float = 60.0) -> int:
        horizon = float(self.period.max()) if len(self.window_device) else 0.0
        return max(int(self.online(t).sum()) for t in np.arange(0.0, horizon + step, step))

    def round_seconds(
        self, device: int, examples: float, down_bytes: float, up_bytes: float
    ) -> float:
        """FedScale's completion time: compute (factor x examples x ms per sample) plus the
        model's download and the update's upload over the device's bandwidths."""
        compute = self.compute_factor * examples * float(self.speed_ms[device]) / 1000.0
        down = 8 * down_bytes / 1000.0 / float(self.down_kbps[device])
        up = 8 * up_bytes / 1000.0 / float(self.up_kbps[device])
        return compute + down + up

    def subset(self, n: int) -> Devices:
        """The first n devices (partitions 0..n-1)."""
        keep = self.window_device < n
        return dataclasses.replace(
            self,
            speed_ms=self.speed_ms[:n],
            down_kbps=self.down_kbps[:n],
            up_kbps=self.up_kbps[:n],
            memory_mb=self.memory_mb[:n],
            period=self.period[:n],
            window_device=self.window_device[keep],
            window_start=self.window_start[keep],
            window_length=self.window_length[keep],
        )


def generate(n: int, model: DeviceModel, seed: int) -> Devices:
    """A population of n devices drawn from `model` (the same n and seed: the same devices)."""
    rng = np.random.default_rng([seed, 0xDE71CE])

    def lognormal(median: float, sigma: float) -> np.ndarray:
        return median * np.exp(sigma * rng.standard_normal(n))

    speed = lognormal(model.speed_ms, model.speed_sigma)
    down = lognormal(model.down_kbps, model.bandwidth_sigma)
    up = lognormal(model.up_kbps, model.bandwidth_sigma)
    memory = lognormal(model.memory_mb, model.memory_sigma)
    start = np.mod(rng.normal(model.start_hour, model.start_sd_hours, n), 24.0) * 3600.0
    length = model.online_hours * 3600.0 * rng.uniform(0.5, 1.5, n)
    windowed = np.flatnonzero(rng.random(n) >= model.always_online)
    return Devices(
        speed_ms=speed,
        down_kbps=down,
        up_kbps=up,
        memory_mb=memory,
        period=np.full(n, DAY),
        window_device=windowed,
        window_start=start[windowed],
        window_length=np.minimum(length[windowed], DAY),
        compute_factor=model.compute_factor,
    )


def load_devices(spec: str, n: int, options: dict[str, Any], seed: int) -> Devices:
    """The first n devices of `spec`: "generated" (drawn from `options`) or a trace file."""
    if spec == GENERATED:
        return generate(n, DeviceModel.from_options(options), seed)
    path = Path(spec)
    if path.suffix.lower() not in (".csv", ".json"):
        raise ConfigError(
            f"devices: {spec!r} is neither {GENERATED!r} nor a .csv or .json trace file"
        )
    if not path.is_file():
        raise ConfigError(f"devices: trace file {path} does not exist")
    unknown = set(options) - {"compute_factor"}
    if unknown:
        raise ConfigError(
            f"device_options: {sorted(unknown)} apply to generated devices; a trace takes "
            "only compute_factor"
        )
    rows = _read_csv(path) if path.suffix.lower() == ".csv" else _read_json(path)
    if len(rows) < n:
        raise ConfigError(
            f"devices: trace {path} has {len(rows)} devices but num_clients is {n}; "
            f"lower --num-clients to {len(rows)} or use a larger trace"
        )
    factor = float(options.get("compute_factor", DeviceModel.compute_factor))
    return _from_rows(path, rows[:n], factor)


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("active", "inactive"):
            if row.get(key) not in (None, ""):
                row[key] = [float(v) for v in str(row[key]).split()]
            else:
                row.pop(key, None)
    return _sorted(rows)


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"devices: {path} is not valid JSON ({exc})") from None
    if isinstance(data, dict):
        data = [{"client_id": k, **v} if isinstance(v, dict) else v for k, v in data.items()]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ConfigError(
            f"devices: {path} must hold {{client_id: {{computation, communication}}}} "
            "or a list of such records"
        )
    return _sorted(data)


def _sorted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in client-id order (numerically where the ids are numbers)."""
    if not rows or any("client_id" not in r for r in rows):
        return rows
    ids = [str(r["client_id"]) for r in rows]
    key = (
        (lambda s: (0, int(s), s))
        if all(i.lstrip("-").isdigit() for i in ids)
        else (lambda s: (1, 0, s))
    )
    order = sorted(range(len(rows)), key=lambda i: key(ids[i]))
    return [rows[i] for i in order]


def _from_rows(path: Path, rows: list[dict[str, Any]], factor: float) -> Devices:
    """Check every row (the first bad one is named) and build the profiles."""

    def number(i: int, row: dict[str, Any], key: str) -> float:
        try:
            value = float(row[key])
        except (TypeError, ValueError):
            raise ConfigError(
                f"devices: {path} device {i}: {key} must be a number, got {row[key]!r}"
            ) from None
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(
                f"devices: {path} device {i}: {key} must be > 0, got {row[key]!r}; "
                "speeds are ms per sample and bandwidths kbit/s"
            )
        return value

    speed, down, up, memory, period = [], [], [], [], []
    win_dev: list[int] = []
    win_start: list[float] = []
    win_len: list[float] = []
    for i, row in enumerate(rows):
        bandwidth = ("communication",) if "communication" in row else ("down_kbps", "up_kbps")
        missing = [k for k in ("computation", *bandwidth) if k not in row or row[k] in ("", None)]
        if not set(missing).isdisjoint(bandwidth) and len(bandwidth) == 2:
            missing = [k for k in missing if k not in bandwidth] + ["communication"]
        if missing:
            raise ConfigError(
                f"devices: {path} device {i} has no {', '.join(missing)}; a trace needs "
                "computation (ms per sample) and communication (kbit/s) or down_kbps and up_kbps"
            )
        speed.append(number(i, row, "computation"))
        down.append(number(i, row, bandwidth[0]))
        up.append(number(i, row, bandwidth[-1]))
        memory.append(
            number(i, row, "memory_mb") if row.get("memory_mb") not in (None, "") else math.inf
        )
        if "active" in row or "inactive" in row:
            active, inactive = list(row.get("active", [])), list(row.get("inactive", []))
            if len(active) != len(inactive) or "finish_time" not in row:
                raise ConfigError(
                    f"devices: {path} device {i}: availability needs as many active as "
                    "inactive times and a finish_time"
                )
            period.append(number(i, row, "finish_time"))
            for on, off in zip(active, inactive, strict=True):
                if not 0 <= float(on) <= float(off):
                    raise ConfigError(
                        f"devices: {path} device {i}: online window [{on}, {off}] is not "
                        "a pair of times with active <= inactive"
                    )
                win_dev.append(i)
                win_start.append(float(on))
                win_len.append(float(off) - float(on))
        else:
            period.append(DAY)
    return Devices(
        speed_ms=np.array(speed),
        down_kbps=np.array(down),
        up_kbps=np.array(up),
        memory_mb=np.array(memory),
        period=np.array(period),
        window_device=np.array(win_dev, dtype=np.int64),
        window_start=np.array(win_start),
        window_length=np.array(win_len),
        compute_factor=factor,
    )
