"""The virtual clock: simulated devices take the time their profiles say, not the host's.

`VirtualClock` wraps a simulation grid. Sampling sees only the devices online at the
clock's time (`get_node_ids`); if fewer are online than a round samples, the clock waits
until enough are. The real compute still runs; afterwards each training reply is stamped
with its device's round time (`virtual_seconds`: compute plus the model's download and the
update's upload, `fedge.simulation.devices.Devices.round_seconds`). A synchronous round
then behaves as FedScale's: clients later than `deadline` are dropped, and of the
over-selected clients the round keeps the first `keep` to finish (the rest are stragglers,
their work discarded); the round lasts until its last kept client finished, or until the
deadline when fewer than `keep` made it. Dropped clients and stragglers reach the strategy
as error replies naming why, so their updates are never aggregated.

An asynchronous strategy (FedBuff) runs its own clock: its instructions carry `virtual-now`,
the time it sent them. The clock then only stamps each reply's round time (the strategy
orders the arrivals) and moves to that time; the next sampling sees the devices online then,
one server step behind the strategy's clock (a known approximation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Message, MessageType

from fedge.compat import error_reply
from fedge.config import RunConfig
from fedge.errors import ConfigError
from fedge.server.observer import PassThroughGrid
from fedge.simulation.devices import Devices, load_devices
from fedge.simulation.local_grid import NODE_ID_BASE, VirtualGrid, array_bytes
from fedge.tasks import Task
from fedge.tasks.base import exchanged_state
from fedge.wire import (
    CONFIG,
    EXAMPLES_SEEN,
    METRICS,
    PEAK_RSS_MB,
    UPDATE_BYTES,
    VIRTUAL_NOW,
    VIRTUAL_SECONDS,
    number,
)


class VirtualClock(PassThroughGrid):
    """`grid` on virtual time. devices: the population (device i = partition i). keep: the
    clients a round aggregates (K). sample: the clients a round samples (over_select x K).
    deadline: virtual seconds a round may last (0: none)."""

    def __init__(
        self, grid: VirtualGrid, devices: Devices, keep: int, sample: int, deadline: float = 0.0
    ) -> None:
        super().__init__(grid)
        self.inner = grid
        self.devices, self.keep, self.sample, self.deadline = devices, keep, sample, deadline
        self.now = 0.0
        self.waited = 0.0  # virtual seconds spent waiting for enough devices to come online
        self.online_at_sampling = len(devices)
        self.last: dict[str, Any] = {}

    # --- sampling -------------------------------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        online = self.devices.online(self.now)
        if int(online.sum()) < self.sample:
            later = self.devices.next_online(self.now, self.sample)
            self.waited += later - self.now
            self.now = later
            online = self.devices.online(self.now)
        self.online_at_sampling = int(online.sum())
        return (NODE_ID_BASE + np.flatnonzero(online)).tolist()

    # --- a round --------------------------------------------------------------------
    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return replies
        sent = {m.metadata.message_id: m for m in messages}
        timed: list[tuple[float, int]] = []  # (virtual seconds, index in replies)
        oom = 0
        for i, reply in enumerate(replies):
            msg = sent.get(reply.metadata.reply_to_message_id)
            if msg is None or reply.has_error() or METRICS not in reply.content.metric_records:
                continue
            device = self.inner.partition_of(msg.metadata.dst_node_id)
            metrics = reply.content.metric_records[METRICS]
            need, have = number(metrics, PEAK_RSS_MB, 0.0), float(self.devices.memory_mb[device])
            if need > have:
                replies[i] = error_reply(
                    msg,
                    f"device {device} ran out of memory (simulated): {need:.0f} MB > {have:.0f} MB",
                )
                oom += 1
                continue
            seconds = self.devices.round_seconds(
                device,
                number(metrics, EXAMPLES_SEEN, 0.0),
                down_bytes=array_bytes(msg.content),
                up_bytes=number(metrics, UPDATE_BYTES, 0.0),
            )
            metrics[VIRTUAL_SECONDS] = seconds
            timed.append((seconds, i))
        config = messages[0].content.config_records.get(CONFIG)
        if config is not None and VIRTUAL_NOW in config:  # an asynchronous strategy's clock
            self.now = number(config, VIRTUAL_NOW)
            self.last = {"online": self.online_at_sampling, "out_of_memory": oom}
            return replies
        self.close_round(messages, replies, sent, sorted(timed), oom)
        return replies

    def close_round(
        self,
        messages: list[Message],
        replies: list[Message],
        sent: dict[str, Message],
        timed: list[tuple[float, int]],
        oom: int,
    ) -> None:
        """Drop the late and the stragglers (as error replies) and move the clock on."""
        in_time = [(s, i) for s, i in timed if not self.deadline or s <= self.deadline]
        kept, extra = in_time[: self.keep], in_time[self.keep :]
        late = [(s, i) for s, i in timed if self.deadline and s > self.deadline]
        for s, i in late:
            replies[i] = error_reply(
                sent[replies[i].metadata.reply_to_message_id],
                f"past the deadline: the device needs {s:.1f} s of virtual time, the round "
                f"allows {self.deadline:g} s",
            )
        cutoff = kept[-1][0] if kept else 0.0
        for s, i in extra:
            replies[i] = error_reply(
                sent[replies[i].metadata.reply_to_message_id],
                f"straggler: over-selected, the round closed when its {self.keep}th client "
                f"finished ({cutoff:.1f} s; this one needed {s:.1f} s)",
            )
        if len(kept) < self.keep and self.deadline and late:
            duration = self.deadline  # the round waited for the deadline
        else:
            duration = cutoff
        self.now += duration
        self.last = {
            "virtual_time": self.now,
            "round_virtual_seconds": duration,
            "stragglers": len(extra),
            "dropped": len(late),
            "out_of_memory": oom,
            "online": self.online_at_sampling,
            "waited_virtual_seconds": self.waited,
        }
        self.waited = 0.0

    def round_extra(self) -> dict[str, Any]:
        last, self.last = self.last, {}
        return last


def load_population(cfg: RunConfig, task: Task) -> Devices:
    """The run's devices, checked before any work: enough of them online at once for a
    round, and a deadline that at least the fastest device can meet."""
    devices = load_devices(cfg.devices, cfg.num_clients, cfg.device_options, cfg.seed)
    sample = math.ceil(cfg.over_select * cfg.sampled_per_round)
    most = devices.max_online(step=600.0)
    if most < sample:
        raise ConfigError(
            f"devices: at most {most} of {len(devices)} devices are online at once, but a round "
            f"samples {sample}; lower clients_per_round or over_select, or use more devices"
        )
    if cfg.deadline:
        size = sum(
            v.numel() * v.element_size() for v in exchanged_state(task.build_model()).values()
        )
        fastest = min(devices.round_seconds(d, 1, size, size) for d in range(len(devices)))
        if fastest > cfg.deadline:
            raise ConfigError(
                f"deadline: no device can finish a round in {cfg.deadline:g} s of virtual time; "
                f"the fastest needs at least {fastest:.1f} s (one sample, the model down and "
                "up); raise --deadline"
            )
    return devices


def with_clock(grid: VirtualGrid, cfg: RunConfig, devices: Devices) -> VirtualClock:
    """`grid` on the virtual clock of `devices`, sampling and keeping as `cfg` says."""
    keep = cfg.sampled_per_round
    return VirtualClock(grid, devices, keep, math.ceil(cfg.over_select * keep), cfg.deadline)
