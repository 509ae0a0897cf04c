"""What crosses the server/client boundary: every record, metric, config and node-config key.

A setting that reaches clients is a field of `ClientSpec`, with its one default here;
`RunConfig` takes its client-facing defaults from `CLIENT_DEFAULTS`. The server sends
`ClientSpec.from_run(cfg).to_record()` with every instruction; a client reads it back with
`ClientSpec.from_record(config, node_config)`, where the node's own settings (its data
folder, its round budget) win. Nothing else in fedge writes one of these keys by hand.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord

from fedge.compat import KEY_CLIPPING_NORM

if TYPE_CHECKING:
    from fedge.config import RunConfig

# --- the entries of a message's RecordDict --------------------------------------------
ARRAYS = "arrays"  # the model weights (ArrayRecord), both ways
CONFIG = "config"  # the instruction's ConfigRecord: the ClientSpec and the strategy's keys
METRICS = "metrics"  # the reply's MetricRecord

# --- config keys a strategy adds to the ClientSpec --------------------------------------
SERVER_ROUND = "server-round"  # written by every Flower strategy
PROXIMAL_MU = "proximal-mu"  # Flower's FedProx: the proximal term's weight
ALGORITHM = "algorithm"  # fedge's strategies: the client half to run (SCAFFOLD, FedNova)
CLIPPING_NORM = KEY_CLIPPING_NORM  # Flower's client-side DP: clip the update to this norm
VIRTUAL_NOW = "virtual-now"  # an asynchronous strategy's clock (FedBuff): when it sent this

# --- secure aggregation (SecAgg+, fedge.strategies.secagg) ------------------------------
SECAGG = "secagg"  # the ConfigRecord of a protocol stage, in the instruction and the reply
SECAGG_MASKED = "secagg-masked"  # the reply's ArrayRecord holding the masked vector
SECAGG_STATE = "secagg"  # the client's protocol state, in its Context.state


class SecAggKey:
    """Keys inside the SECAGG ConfigRecord (server -> client, and the replies)."""

    STAGE = "stage"  # one of SecAggStage
    ROUND = "round"  # the server round the protocol run belongs to
    NEIGHBOURS = "neighbours"  # setup: the client's neighbours in the graph (node ids)
    THRESHOLD = "threshold"  # setup: t, shares needed to rebuild a secret
    CLIP_RANGE = "clip-range"  # setup: each update entry is clipped to [-R, R]
    QUANT_BITS = "quant-bits"  # setup: an entry is quantized to [0, 2^bits]
    WEIGHT_KEY = "weight-key"  # setup: the reply metric that weights the client's update
    MAX_WEIGHT = "max-weight"  # setup: the largest weight that cannot overflow the sum
    PK_ENC = "pk-enc"  # public key(s) for encrypting shares (c_u^PK)
    PK_MASK = "pk-mask"  # public key(s) for agreeing on pairwise masks (s_u^PK)
    PEERS = "peers"  # node ids the lists beside it refer to
    CIPHERTEXTS = "ciphertexts"  # encrypted shares
    ACCEPTED = "accepted"  # collect: peers whose shares decrypted and checked out
    ALIVE = "alive"  # unmask: peers whose mask seed b shares to reveal
    DEAD = "dead"  # unmask: peers whose mask key s^SK shares to reveal
    SHARES = "shares"  # unmask: the revealed shares, beside PEERS
    VECTOR = "vector"  # the masked vector's Array inside SECAGG_MASKED


class SecAggStage:
    """The four rounds of SecAgg+ (Bell et al. 2020, after Bonawitz et al. 2017)."""

    SETUP = "setup"  # advertise keys
    SHARE_KEYS = "share-keys"  # share the mask seed and mask key
    COLLECT = "collect"  # train, then send the masked update
    UNMASK = "unmask"  # reveal shares of the survivors' seeds and the dropouts' keys


# --- node-config keys (`flower-supernode --node-config`, or the simulation's nodes) ----
PARTITION_ID = "partition-id"  # which partition of the task's data this node holds
NUM_PARTITIONS = "num-partitions"  # how many partitions the data is cut into
NODE_TASK = "task"  # the task the device was started for (checked against the run's)
NODE_DATA_DIR = "data-dir"  # the device's own dataset folder (wins over the run's)
NODE_MAX_TRAIN_SECONDS = "max-train-seconds"  # the device's round budget (wins over the run's)
NODE_MAX_TRAIN_STEPS = "max-train-steps"  # the device's step budget, e.g. its scheduler's grant
NODE_FAULT = "fault"  # a fault this node simulates whatever the run says (KIND[=ARG])

# --- metrics a client reports -----------------------------------------------------------
NUM_EXAMPLES = "num-examples"  # local examples: the weight of the reply in aggregation
TRAIN_LOSS = "train_loss"
TRAIN_SECONDS = "train_seconds"
PEAK_RSS_MB = "peak_rss_mb"  # peak resident memory of the client's process
EXAMPLES_SEEN = "examples_seen"  # examples processed in the round (epochs x data, or less)
STEPS = "steps"  # local SGD steps taken
STOPPED_EARLY = "stopped_early"  # 1 if the round budget cut training short
UPDATE_BYTES = "update_bytes"  # bytes of the arrays the reply carries
EMD = "emd"  # earth mover's distance of the client's labels from the population's
DP_WEIGHT = "dp-weight"  # 1 from every client under DP: equal FedAvg weights, as accounting needs
LABEL_COUNTS = "label_counts"  # a device's own data: examples per label (index = label)
WAIT_SECONDS = "wait_seconds"  # from the instruction's making on the server to the ClientApp
FIRST_COMPUTE_SECONDS = "first_compute_seconds"  # ClientApp start to first compute (loading)
EVAL_SECONDS = "eval_seconds"  # local evaluation
UPLOAD_SECONDS = "upload_seconds"  # the reply's making on the device to its arrival (server)
DEVICE_SECONDS = "device_seconds"  # instruction made -> reply arrived (server)
TRAIN_LOSS_SQUARED = "train_loss_squared"  # mean squared batch loss (Oort's utility)
VIRTUAL_SECONDS = "virtual_seconds"  # the virtual clock: the device's round (compute + transfer)


# what a MetricRecord holds (Flower's record value types)
MetricValues = dict[str, int | float | list[int] | list[float]]


def number(record: Mapping[str, Any], key: str, default: float | None = None) -> float:
    """A scalar metric or config value as a float; a clear error when a peer sent a list or
    text where fedge expects a number (`default` where the key is missing, if given)."""
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key!r} must be a number, got {value!r}")
    return float(value)


def node_config(partition_id: int, num_partitions: int) -> dict[str, bool | float | int | str]:
    """The node config of a simulated node holding partition `partition_id`."""
    return {PARTITION_ID: partition_id, NUM_PARTITIONS: num_partitions}


@dataclass(frozen=True)
class ClientSpec:
    """Everything a client needs to know about the run, with the run's defaults.

    Frozen and hashable, so a client keys its task and data caches by it.
    """

    task: str = "digits"  # registered name or module:Class
    task_options: str = "{}"  # JSON object of the task's keyword options, sorted keys
    data_dir: str = ""  # dataset folder ("" for the task's offline data)
    partition: str = "iid"  # partition scheme (fedge.data.partition)
    seed: int = 0  # seeds partitions, local data order and simulated faults
    num_clients: int = 10  # partitions the server cut the data into (a partition device's count)
    shared_fraction: float = 0.0  # Zhao's alpha: size of the shared subset G
    shared_per_client: float = 1.0  # Zhao's beta: the fraction of G each client mixes in
    local_epochs: int = 2  # passes over local data per round
    batch_size: int = 16  # local minibatch size
    lr: float = 0.05  # local SGD learning rate in round 1
    lr_decay: float = 1.0  # learning rate multiplier per round
    momentum: float = 0.9  # local SGD momentum
    max_train_seconds: float = 0.0  # per-round local training budget (0: none)
    max_train_steps: int = 0  # per-round local training budget in SGD steps (0: none)
    device: str = "cpu"  # torch device: cpu, cuda, auto
    faults: str = ""  # simulated faults, KIND[=ARG]:FRACTION,... (fedge.faults)

    @classmethod
    def from_run(cls, cfg: RunConfig) -> ClientSpec:
        """The client-facing part of a run's config."""
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)}
        values["task_options"] = json.dumps(cfg.task_options, sort_keys=True)
        values["data_dir"] = cfg.data_dir or ""
        return cls(**values)

    def to_record(self) -> ConfigRecord:
        """The ConfigRecord every instruction carries (keys dash-separated, as Flower's)."""
        return ConfigRecord({_key(name): value for name, value in dataclasses.asdict(self).items()})

    @classmethod
    def from_record(cls, config: Mapping[str, Any], node_config: Mapping[str, Any]) -> ClientSpec:
        """Read an instruction's config; a missing key takes its default, the node's own
        data folder and budgets win, and a device started for another task is refused."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            default = getattr(CLIENT_DEFAULTS, f.name)
            values[f.name] = type(default)(config.get(_key(f.name), default))
        local_task = node_config.get(NODE_TASK)
        if local_task and local_task != values["task"]:
            raise ValueError(
                f"this client was started for task {local_task!r} but the server runs "
                f"{values['task']!r}; start the client with the server's --task"
            )
        sent_clients = config.get(_key("num_clients"))
        if PARTITION_ID in node_config and sent_clients is not None:
            if int(node_config[NUM_PARTITIONS]) != int(sent_clients):
                raise ValueError(
                    f"this client was started with --num-partitions "
                    f"{node_config[NUM_PARTITIONS]} but the server runs {sent_clients} clients; "
                    f"start it with --num-partitions {sent_clients}"
                )
        if node_config.get(NODE_DATA_DIR):
            values["data_dir"] = str(node_config[NODE_DATA_DIR])
        if NODE_MAX_TRAIN_SECONDS in node_config:
            values["max_train_seconds"] = float(node_config[NODE_MAX_TRAIN_SECONDS])
        if NODE_MAX_TRAIN_STEPS in node_config:
            values["max_train_steps"] = int(node_config[NODE_MAX_TRAIN_STEPS])
        return cls(**values)

    def round_lr(self, server_round: int) -> float:
        """The local learning rate in round `server_round` (1-based): lr x lr_decay^(r-1)."""
        return self.lr * self.lr_decay ** (server_round - 1)

    def options(self) -> dict[str, Any]:
        """The task's keyword options."""
        return json.loads(self.task_options)


CLIENT_DEFAULTS = ClientSpec()


def _key(name: str) -> str:
    return name.replace("_", "-")
