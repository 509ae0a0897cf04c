"""An in-process Grid: the same ClientApp, called directly, one message after another.

It is the smallest faithful engine: no SuperLink, no Ray, no polling. Tests, debugging
and small runs use it; `fedge.simulation.ray_grid` scales the same contract out.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterable

from flwr.app import Context, Message, RecordDict, UserConfig
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedge.compat import (
    ErrorCode,
    Run,
    assign_message_id,
    claim_server_identity,
    empty_run,
    error_reply,
)
from fedge.wire import node_config

NODE_ID_BASE = 100  # node ids 0 and 1 are reserved by Flower; partition i is node 100 + i
log = logging.getLogger("fedge")


def call_client_app(app: ClientApp, message: Message, context: Context) -> Message:
    """One ClientApp call; an exception or a reply to another message becomes an error reply."""
    try:
        reply = app(message, context)
    except Exception as exc:  # a raising client must not stop the round
        log.warning("client %d raised: %s", message.metadata.dst_node_id, exc)
        return error_reply(message, "".join(traceback.format_exception_only(exc)).strip())
    if reply.metadata.reply_to_message_id != message.metadata.message_id:
        return error_reply(message, "ClientApp replied to a different message")
    return reply


def array_bytes(content: RecordDict) -> int:
    """Bytes of model arrays in a message: a reply to it is about as large."""
    return sum(len(a.data) for rec in content.array_records.values() for a in rec.values())


class VirtualGrid(Grid):
    """What every fedge simulation grid shares: `num_nodes` virtual nodes with fixed ids
    (partition i is node NODE_ID_BASE + i) and the SuperLink's identity in this process."""

    def __init__(self, num_nodes: int, run_id: int = 1) -> None:
        self.num_nodes = num_nodes
        self.set_run(empty_run(run_id))

    def set_run(self, run: Run) -> None:
        self._run = run
        self.run_id = run.run_id
        claim_server_identity(run.run_id)

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return range(NODE_ID_BASE, NODE_ID_BASE + self.num_nodes)

    def partition_of(self, node_id: int) -> int:
        """The partition a node holds; an error for nodes outside the grid."""
        pid = node_id - NODE_ID_BASE
        if not 0 <= pid < self.num_nodes:
            raise ValueError(f"node {node_id} is not part of this grid")
        return pid


class LocalGrid(VirtualGrid):
    """Runs `client_app` for `num_nodes` virtual nodes in this process.

    Each node keeps its own `Context` (and so its `state`) across rounds; contexts are
    built on first use, so a large population costs nothing until sampled. `run_config`:
    what every node's Context carries (a Flower App's run config; fedge's ClientApp needs
    none).
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_id: int = 1,
        run_config: UserConfig | None = None,
    ) -> None:
        super().__init__(num_nodes, run_id)
        self.client_app = client_app
        self.run_config = run_config or {}
        self._contexts: dict[int, Context] = {}
        self._replies: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            mid = assign_message_id(message)
            self._replies[mid] = self.deliver(message)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        deadline = time.monotonic() + timeout if timeout else float("inf")
        replies = []
        for message in messages:
            assign_message_id(message)
            if time.monotonic() > deadline:  # late: the round is over for this node
                replies.append(
                    error_reply(message, "round timeout", ErrorCode.REPLY_MESSAGE_UNAVAILABLE)
                )
                continue
            replies.append(self.deliver(message))
        return replies

    # --- delivery -------------------------------------------------------------------
    def context(self, node_id: int) -> Context:
        """The node's persistent Context, created on first use."""
        if node_id not in self._contexts:
            pid = self.partition_of(node_id)
            self._contexts[node_id] = Context(
                run_id=self.run_id,
                node_id=node_id,
                node_config=node_config(pid, self.num_nodes),
                state=RecordDict(),
                run_config=dict(self.run_config),
            )
        return self._contexts[node_id]

    def deliver(self, message: Message) -> Message:
        return call_client_app(self.client_app, message, self.context(message.metadata.dst_node_id))
