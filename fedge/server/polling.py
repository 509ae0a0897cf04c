"""A Grid that waits for replies without fixed sleeps and sends few objects per message.

Flower's `HttpGrid.send_and_receive` (the Grid of a ServerApp under a SuperLink) sleeps 3 s
between pulls, and waits 1 s (then 2 s, ...) for a reply whose objects are still being
uploaded. `PromptGrid` pushes and pulls through the wrapped grid's public methods, waits
10 ms after a pull that brought a reply, growing to 100 ms while none comes, and has
Flower retry a missing object after 5 ms (`fedge.compat.patch_object_pulls`). It stamps
each reply with its delivery times (`stamp_delivery`). It packs what it sends and unpacks
the replies (`fedge.edge.packing`: a message's objects, one HTTP request each through the
SuperLink, fall from two per tensor to three per message while it fits in a chunk).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedge import compat
from fedge.edge.packing import is_packed, pack, unpack
from fedge.edge.poll import Backoff
from fedge.server.observer import PassThroughGrid
from fedge.wire import DEVICE_SECONDS, METRICS, UPLOAD_SECONDS


def stamp_delivery(reply: Message, sent_at: float | None) -> None:
    """Add to a reply's metrics, as it arrives: `upload_seconds` (from the reply's making
    on the device to its arrival here) and `device_seconds` (from the instruction's making
    here to its reply's arrival: what this device added to the round)."""
    if reply.has_error() or METRICS not in reply.content.metric_records:
        return
    now = time.time()
    metrics = reply.content.metric_records[METRICS]
    metrics[UPLOAD_SECONDS] = max(0.0, now - reply.metadata.created_at)
    if sent_at is not None:
        metrics[DEVICE_SECONDS] = now - sent_at


class PromptGrid(PassThroughGrid):
    """`grid` with a `send_and_receive` that polls for replies with a short backoff, and
    messages packed on the wire."""

    def __init__(self, grid: Grid, low: float = 0.01, high: float = 0.1) -> None:
        compat.patch_object_pulls("flwr.superlink.grid.http_grid")
        super().__init__(grid)
        self.low, self.high = low, high

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        plain = [message.content for message in messages]
        for message in messages:
            message.content = pack(message.content)
        try:
            return list(self.grid.push_messages(messages))
        finally:  # the caller's messages keep what the strategy put in them
            for message, content in zip(messages, plain, strict=True):
                message.content = content

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            if not reply.has_error() and is_packed(reply.content):
                reply.content = unpack(reply.content)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        made = {m.metadata.dst_node_id: m.metadata.created_at for m in messages}
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        poll, replies = Backoff(self.low, self.high), []
        while waiting:
            got = list(self.pull_messages(waiting))
            for reply in got:
                stamp_delivery(reply, made.get(reply.metadata.src_node_id))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            if got:
                poll.reset()
            poll.wait()
        return replies
