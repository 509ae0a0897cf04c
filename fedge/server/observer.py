"""Between the strategy and the Grid: every training reply screened, every round's replies kept.

`RoundObserver` is a Grid the strategy sends through without knowing it is there. Training
replies that fail the update check (`update_check`: validation against the server's model
and the weights sent) reach the strategy as error replies naming the reason, so they are
never aggregated; the server reads the round's device metrics, failures, rejections and
client drift from `take_round()`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from rich.console import Console

from fedge.compat import Run, error_reply
from fedge.data.divergence import client_drift
from fedge.server.validation import check_update
from fedge.tasks.base import exchanged_state
from fedge.wire import ARRAYS, METRICS, NUM_EXAMPLES, number

console = Console(highlight=False, soft_wrap=True)

# (training reply, the instruction it answers) -> (why it must not be aggregated, or None;
# its drift ||w_k - w_t|| / ||w_t||, or None where the model could not be read)
ReplyCheck = Callable[[Message, Message], tuple[str | None, float | None]]


@dataclass
class RoundReplies:
    """What one round's messages brought back, as the server records it."""

    train: list[Message] = field(default_factory=list)  # screened training replies
    unanswered: int = 0  # sampled nodes that never answered the training instruction
    rejected: int = 0  # training replies the update check refused
    drift: dict[str, float] = field(default_factory=dict)  # `drift_mean`, `drift_max`
    evaluate: list[Message] = field(default_factory=list)  # federated evaluation replies
    extra: dict[str, Any] = field(default_factory=dict)  # the grid's own (virtual clock)


class PassThroughGrid(Grid):
    """A Grid that hands every call to `grid`; subclasses change what they need."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def population(self) -> Iterable[int]:
        """Every connected node, online or not (a virtual clock offers only the online ones
        to sampling, through `get_node_ids`)."""
        inner = self.grid
        return inner.population() if isinstance(inner, PassThroughGrid) else inner.get_node_ids()

    def round_extra(self) -> dict[str, Any]:
        """What a wrapper measured in the last round for its history record (a virtual
        clock's time, stragglers, dropped clients); {} by default."""
        return self.grid.round_extra() if isinstance(self.grid, PassThroughGrid) else {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


class RoundObserver(PassThroughGrid):
    """Passes everything through to `grid`, keeping the last replies of each message type."""

    def __init__(self, grid: Grid, check: ReplyCheck | None = None) -> None:
        super().__init__(grid)
        self.check = check
        self.last: dict[str, tuple[list[Message], int]] = {}  # kind -> (replies, unanswered)
        self.rejected = 0  # training replies refused since the last take_round()
        self.drift: list[tuple[float, float]] = []  # (drift, n_k) of accepted training replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        # instructions without a model are a secure aggregation stage: not the round's replies
        if messages and messages[0].content.array_records:
            kind = messages[0].metadata.message_type
            if kind == MessageType.TRAIN and self.check is not None:
                replies = self.screen(messages, replies)
            self.last[kind] = (replies, len(messages) - len(replies))
        return replies

    def screen(self, messages: list[Message], replies: list[Message]) -> list[Message]:
        """Replace each reply that fails the check by an error reply naming the reason."""
        assert self.check is not None
        sent = {m.metadata.dst_node_id: m for m in messages}
        screened = []
        for reply in replies:
            node = reply.metadata.src_node_id
            reason, drift = self.check(reply, sent[node]) if node in sent else (None, None)
            if drift is not None and not reason:
                metrics = reply.content.metric_records.get(METRICS, MetricRecord())
                self.drift.append((drift, number(metrics, NUM_EXAMPLES, 1.0)))
            if reason:
                console.print(f"rejected the update of node {node}: {reason}")
                self.rejected += 1
                reply = error_reply(sent[node], f"update rejected by the server: {reason}")
            screened.append(reply)
        return screened

    def take_round(self) -> RoundReplies:
        """The last round's replies, counts and drift; the observer starts the next afresh."""
        train, unanswered = self.last.pop(MessageType.TRAIN, ([], 0))
        evaluate, _ = self.last.pop(MessageType.EVALUATE, ([], 0))
        drift, self.drift = self.drift, []
        rejected, self.rejected = self.rejected, 0
        return RoundReplies(
            train=train,
            unanswered=unanswered,
            rejected=rejected,
            drift=client_drift([d for d, _ in drift], [n for _, n in drift]),
            evaluate=evaluate,
            extra=self.round_extra(),
        )


def update_check(model: torch.nn.Module, max_update_norm: float) -> ReplyCheck:
    """Validation of a training reply against the server's model and the weights sent.

    A round's instructions share one ArrayRecord: it is decoded once, not once per reply.
    """
    reference = ArrayRecord(exchanged_state(model))
    decoded: dict[str, Any] = {"record": None, "values": None}

    def check(reply: Message, instruction: Message) -> tuple[str | None, float | None]:
        sent = instruction.content.array_records[ARRAYS]
        if decoded["record"] is not sent:
            values: dict[str, np.ndarray] = {k: a.numpy() for k, a in sent.items()}
            decoded.update(record=sent, values=values)
        return check_update(reply, decoded["values"], reference, max_update_norm)

    return check
