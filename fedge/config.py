"""One typed run configuration. A TOML file and command-line flags both land here.

Every field has a default, a type and a check; `RunConfig.from_mapping` names the field
and what is allowed when a value is wrong, so a bad config fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.errors import ConfigError, did_you_mean
from fedge.wire import CLIENT_DEFAULTS

__all__ = ["ConfigError", "RunConfig", "SERVER_FIELDS", "parse_option", "saved_config"]


def opt(default: Any, help: str) -> Any:
    """A config field with its default and the help text `fedge --help` shows."""
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """Everything a federated run needs; field docs appear in `fedge run --help`."""

    task: str = opt(
        CLIENT_DEFAULTS.task, "task name (digits, mobilellm, asr, kws, hrvit) or module:Class"
    )
    task_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "keyword options of the task"}
    )
    data_dir: str | None = opt(None, "folder with a real dataset for the task (else offline data)")
    num_clients: int = opt(
        CLIENT_DEFAULTS.num_clients, "total clients (partitions); the server waits for this many"
    )
    clients_per_round: int = opt(0, "clients sampled per round (0: all)")
    rounds: int = opt(5, "federated rounds")
    strategy: str = opt("fedavg", "strategy name or module:Class")
    strategy_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "strategy keyword options"}
    )
    partition: str = opt(
        CLIENT_DEFAULTS.partition, "iid, label-k:K, dirichlet:ALPHA, quantity:ALPHA, natural"
    )
    local_epochs: int = opt(CLIENT_DEFAULTS.local_epochs, "passes over local data per round")
    batch_size: int = opt(CLIENT_DEFAULTS.batch_size, "local minibatch size")
    lr: float = opt(CLIENT_DEFAULTS.lr, "local SGD learning rate")
    momentum: float = opt(CLIENT_DEFAULTS.momentum, "local SGD momentum")
    lr_decay: float = opt(CLIENT_DEFAULTS.lr_decay, "learning rate multiplier per round")
    max_train_seconds: float = opt(
        CLIENT_DEFAULTS.max_train_seconds, "per-round local training budget in seconds (0: none)"
    )
    max_train_steps: int = opt(
        CLIENT_DEFAULTS.max_train_steps, "per-round local training budget in steps (0: none)"
    )
    eval_fraction: float = opt(0.5, "fraction of clients asked for federated evaluation (0: none)")
    round_timeout: float = opt(3600.0, "seconds the server waits for a round's replies")
    seed: int = opt(CLIENT_DEFAULTS.seed, "seed for model init, partitions and sampling")
    shared_fraction: float = opt(
        CLIENT_DEFAULTS.shared_fraction,
        "size of the globally shared subset G over the clients' data (Zhao's alpha)",
    )
    shared_per_client: float = opt(
        CLIENT_DEFAULTS.shared_per_client, "random fraction of G each client mixes in (beta)"
    )
    warmup_epochs: int = opt(0, "epochs the server trains the initial model on G")
    track_divergence: bool = opt(False, "shadow centralized SGD for weight divergence (slow)")
    backend: str = opt(
        "ray", "simulation engine: ray (fedge's RayGrid), local (in-process), flower (Flower's)"
    )
    ray_address: str | None = opt(None, "join this Ray cluster (else $RAY_ADDRESS, else local)")
    client_cpus: float = opt(1.0, "CPUs one simulated client needs (fractions allowed)")
    client_gpus: float = opt(0.0, "GPUs one simulated client needs (fractions allowed)")
    dropout_rate: float = opt(0.0, "probability that a sampled client fails (simulated)")
    faults: str = opt(
        CLIENT_DEFAULTS.faults,
        "simulated faulty clients, KIND[=ARG]:FRACTION,... (nan, shape, signflip, slow, ...)",
    )
    max_update_norm: float = opt(
        10.0, "reject updates whose norm is over this many times the model's norm (0: off)"
    )
    dp_noise: float = opt(0.0, "differential privacy noise multiplier (0: off); clients clip")
    dp_clip: float = opt(1.0, "differential privacy: clipping norm of each client's update")
    dp_delta: float = opt(1e-5, "differential privacy: the delta that epsilon is reported at")
    # --- secure aggregation (SecAgg+, fedge.strategies.secagg) ---------------------------
    secure_aggregation: bool = opt(False, "SecAgg+: the server learns only the sum of updates")
    secagg_threshold: float = opt(
        0.5, "SecAgg+: shares needed to rebuild a client's secrets, a fraction of its holders"
    )
    secagg_clip_range: float = opt(
        1.0, "SecAgg+: each entry of an update is clipped to [-R, R] before quantization"
    )
    secagg_quantization: int = opt(24, "SecAgg+: bits per quantized update entry (1..30)")
    # --- end of secure aggregation ---------------------------------------------------------
    resume: bool = opt(False, "continue the run in `out` from its last intact round")
    overwrite: bool = opt(False, "clear a non-empty `out` first (else only `resume` may reuse it)")
    max_failed_rounds: int = opt(
        3, "stop after this many rounds in a row that aggregated no update (0: never stop)"
    )
    out: str = opt("runs/latest", "folder for history.json, checkpoints and plots")
    device: str = opt(CLIENT_DEFAULTS.device, "torch device for training: cpu, cuda, or auto")

    # --- device populations, the virtual clock and selection (issue 18) ------------------
    # server-side only (POPULATION_FIELDS); checked in `_validate_population`
    devices: str = opt(
        "", "device profiles: '' (none, no virtual clock), generated, or a .csv/.json trace"
    )
    device_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "parameters of generated devices (fedge.simulation.devices.DeviceModel)"},
    )
    deadline: float = opt(0.0, "virtual seconds a round may last; later clients drop (0: none)")
    over_select: float = opt(1.0, "sample this many times clients_per_round; keep the first K")
    target_accuracy: float = opt(
        0.0, "report the virtual time at which the task's metric first reaches this (0: none)"
    )
    selection: str = opt("random", "client selection: random (the strategy's) or oort")
    selection_options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "selector options (fedge.strategies.oort)"}
    )

    # --- a Flower App folder instead of a task (fedge.app_folder) -------------------------
    app: str = opt("", "a Flower App folder to run: its ServerApp and ClientApp, not a task")
    run_config: str = opt(
        "", "with app: overrides of the app's run config, 'key=value ...' as `flwr run` takes"
    )

    # --- loading ------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a flat mapping (TOML or flags); unknown keys and bad types are errors."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(
                    f"{key}: unknown field{did_you_mean(name, known)}; "
                    f"known fields: {', '.join(known)}"
                )
            kwargs[name] = _coerce(name, known[name].type, value)
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def from_toml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
        """Read a TOML file; `overrides` (from flags) win over its values."""
        try:
            values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config: file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
        return cls.from_mapping({**values, **(overrides or {})})

    def validate(self) -> None:
        """Check ranges and cross-field rules; raise ConfigError naming the field."""
        from fedge.data.partition import parse_scheme
        from fedge.faults import parse_faults

        _check(self.num_clients >= 1, "num_clients", "must be >= 1", self.num_clients)
        _check(
            0 <= self.clients_per_round <= self.num_clients,
            "clients_per_round",
            f"must be between 0 and num_clients ({self.num_clients})",
            self.clients_per_round,
        )
        _check(self.rounds >= 1, "rounds", "must be >= 1", self.rounds)
        _check(self.local_epochs >= 1, "local_epochs", "must be >= 1", self.local_epochs)
        _check(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        _check(self.lr > 0, "lr", "must be > 0", self.lr)
        _check(0 <= self.momentum < 1, "momentum", "must be in [0, 1)", self.momentum)
        _check(0 < self.lr_decay <= 1, "lr_decay", "must be in (0, 1]", self.lr_decay)
        _check(
            self.max_train_seconds >= 0, "max_train_seconds", "must be >= 0", self.max_train_seconds
        )
        _check(self.max_train_steps >= 0, "max_train_steps", "must be >= 0", self.max_train_steps)
        _check(
            0 <= self.eval_fraction <= 1, "eval_fraction", "must be in [0, 1]", self.eval_fraction
        )
        _check(self.round_timeout > 0, "round_timeout", "must be > 0", self.round_timeout)
        _check(self.backend in BACKENDS, "backend", f"must be one of {BACKENDS}", self.backend)
        _check(self.client_cpus > 0, "client_cpus", "must be > 0", self.client_cpus)
        _check(self.client_gpus >= 0, "client_gpus", "must be >= 0", self.client_gpus)
        _check(0 <= self.dropout_rate < 1, "dropout_rate", "must be in [0, 1)", self.dropout_rate)
        _check(
            self.device in ("cpu", "cuda", "auto"),
            "device",
            "must be cpu, cuda or auto",
            self.device,
        )
        _check(
            0 <= self.shared_fraction < 1,
            "shared_fraction",
            "must be in [0, 1)",
            self.shared_fraction,
        )
        _check(
            0 <= self.shared_per_client <= 1,
            "shared_per_client",
            "must be in [0, 1]",
            self.shared_per_client,
        )
        _check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0", self.warmup_epochs)
        _check(
            self.warmup_epochs == 0 or self.shared_fraction > 0,
            "warmup_epochs",
            "needs shared data to train on: set shared_fraction > 0",
            self.warmup_epochs,
        )
        try:
            parse_scheme(self.partition)
        except ValueError as exc:
            raise ConfigError(f"partition: {exc}") from None
        try:
            parse_faults(self.faults)
        except ValueError as exc:
            raise ConfigError(f"faults: {exc}") from None
        _check(self.max_update_norm >= 0, "max_update_norm", "must be >= 0", self.max_update_norm)
        _check(
            self.max_failed_rounds >= 0, "max_failed_rounds", "must be >= 0", self.max_failed_rounds
        )
        _check(
            not (self.resume and self.overwrite),
            "overwrite",
            "cannot be combined with resume (it would delete the run being resumed)",
            self.overwrite,
        )
        _check(self.dp_noise >= 0, "dp_noise", "must be >= 0", self.dp_noise)
        _check(self.dp_clip > 0, "dp_clip", "must be > 0", self.dp_clip)
        _check(0 < self.dp_delta < 1, "dp_delta", "must be in (0, 1)", self.dp_delta)
        # secure aggregation
        _check(
            0 < self.secagg_threshold <= 1,
            "secagg_threshold",
            "must be in (0, 1]",
            self.secagg_threshold,
        )
        _check(
            self.secagg_clip_range > 0, "secagg_clip_range", "must be > 0", self.secagg_clip_range
        )
        _check(
            1 <= self.secagg_quantization <= 30,
            "secagg_quantization",
            "must be 1..30 bits",
            self.secagg_quantization,
        )
        _check(
            not (self.resume and self.track_divergence),
            "resume",
            "cannot continue a run with track_divergence (its shadow SGD is not checkpointed)",
            self.resume,
        )
        self._validate_population()
        self._validate_app()

    def _validate_app(self) -> None:
        """With `app`, the app's own ServerApp decides rounds, strategy and training: a
        field that would configure fedge's task or server is an error, not ignored."""
        _check(not self.run_config or bool(self.app), "run_config", "needs app", self.run_config)
        if not self.app:
            return
        for f in dataclasses.fields(self):
            if f.name in APP_FIELDS:
                continue
            default = f.default_factory() if callable(f.default_factory) else f.default
            _check(
                getattr(self, f.name) == default,
                f.name,
                "does not apply to a Flower App, whose ServerApp decides (its keys: run_config)",
                getattr(self, f.name),
            )

    def _validate_population(self) -> None:
        """The device-population fields: ranges, and the clock they need."""
        _check(self.deadline >= 0, "deadline", "must be >= 0 virtual seconds", self.deadline)
        _check(self.over_select >= 1, "over_select", "must be >= 1", self.over_select)
        _check(
            self.selection in SELECTIONS,
            "selection",
            f"must be one of {SELECTIONS}",
            self.selection,
        )
        _check(self.target_accuracy >= 0, "target_accuracy", "must be >= 0", self.target_accuracy)
        for name in ("deadline", "over_select"):
            _check(
                bool(self.devices) or getattr(self, name) == getattr(RunConfig, name),
                name,
                "needs the virtual clock: set devices (generated or a trace file)",
                getattr(self, name),
            )
        _check(
            not self.device_options or bool(self.devices),
            "device_options",
            "apply to a device population: set devices",
            self.device_options,
        )
        _check(
            not self.devices or self.backend in ("ray", "local"),
            "devices",
            "the virtual clock runs on fedge's engines: use backend ray or local",
            self.devices,
        )
        _check(
            math.ceil(self.over_select * self.sampled_per_round) <= self.num_clients,
            "over_select",
            f"samples more clients than num_clients ({self.num_clients})",
            self.over_select,
        )

    # --- derived ------------------------------------------------------------------------
    @property
    def sampled_per_round(self) -> int:
        return self.clients_per_round or self.num_clients

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


BACKENDS = ("ray", "local", "flower")
# RunConfig fields that stay on the server; every other field reaches the clients as a
# field of `fedge.wire.ClientSpec` (tests check that the two sets cover RunConfig)
SERVER_FIELDS = frozenset(
    {
        "clients_per_round",
        "rounds",
        "strategy",
        "strategy_options",
        "eval_fraction",
        "round_timeout",
        "warmup_epochs",
        "track_divergence",
        "backend",
        "ray_address",
        "client_cpus",
        "client_gpus",
        "dropout_rate",
        "max_update_norm",
        "dp_noise",
        "dp_clip",
        "dp_delta",
        "secure_aggregation",  # SecAgg+: its settings reach clients in its own stage messages
        "secagg_threshold",
        "secagg_clip_range",
        "secagg_quantization",
        "resume",
        "overwrite",
        "max_failed_rounds",
        "out",
        "app",
        "run_config",
    }
)
# what a run of a Flower App (`app`) takes from fedge: the engine, the population, `out`
APP_FIELDS = frozenset(
    {
        "app",
        "run_config",
        "num_clients",
        "backend",
        "ray_address",
        "client_cpus",
        "client_gpus",
        "dropout_rate",
        "seed",
        "out",
        "overwrite",
    }
)
SELECTIONS = ("random", "oort")
# the device-population fields (issue 18) stay on the server too
POPULATION_FIELDS = frozenset(
    {
        "devices",
        "device_options",
        "deadline",
        "over_select",
        "target_accuracy",
        "selection",
        "selection_options",
    }
)
SERVER_FIELDS = SERVER_FIELDS | POPULATION_FIELDS


def saved_config(run_dir: str | Path) -> dict[str, Any]:
    """The config a run in `run_dir` was started with, as its `config.json` holds it."""
    path = Path(run_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run_dir}: no config.json there; is it a fedge run?") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is damaged ({exc})") from None


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name}: {rule}, got {value!r}")


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Convert a TOML or flag value to the field's type, or explain what was expected."""
    kind = str(annotation)
    try:
        if kind.startswith("dict"):
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind.startswith("str | None"):
            return None if value in (None, "") else str(value)
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            if not isinstance(value, bool | int) or value not in (0, 1):
                raise TypeError
            return bool(value)
        if kind == "str":
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError, json.JSONDecodeError):
        pass
    else:
        raise TypeError(f"RunConfig.{name}: no conversion for field type {kind!r}")
    expected = {
        "int": "an integer",
        "float": "a number",
        "str": "a string",
        "bool": "true/false",
    }.get(kind, "a table")
    raise ConfigError(f"{name}: expected {expected}, got {value!r}")


def parse_option(text: str) -> tuple[str, Any]:
    """`key=value` from a `--task-option`/`--strategy-option` flag; JSON values are parsed."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"option {text!r}: expected key=value")
    try:
        return key.replace("-", "_"), json.loads(raw)
    except json.JSONDecodeError:
        return key.replace("-", "_"), raw
