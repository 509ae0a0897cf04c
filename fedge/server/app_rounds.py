"""The history of a Flower App's run, from what crosses its Grid.

A Flower App brings its own ServerApp and strategy, so fedge cannot ask it for a round's
metrics; it sees the messages. `RoundRecorder` sits between the app's ServerApp and the
Grid and makes one record per training round (the round's replies, failures and seconds,
from one training instruction to the next), so `history.json` exists for an app too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType
from flwr.serverapp import Grid
from rich.console import Console

from fedge.files import atomic_write_bytes
from fedge.server.history import failure_reasons
from fedge.server.observer import PassThroughGrid
from fedge.wire import CONFIG, SERVER_ROUND

console = Console(highlight=False, soft_wrap=True)


class RoundRecorder(PassThroughGrid):
    """Passes everything through to `grid`; writes `out/history.json` after every round."""

    def __init__(self, grid: Grid, out: Path) -> None:
        super().__init__(grid)
        self.out = out
        self.records: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self.started = 0.0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else ""
        if kind == MessageType.TRAIN:
            self.finish()  # the next training round: the last one is over
            self.started = time.perf_counter()
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        if kind == MessageType.TRAIN:
            config = messages[0].content.config_records.get(CONFIG, ConfigRecord())
            self.current = {
                "round": config.get(SERVER_ROUND, len(self.records) + 1),
                **tally(replies, len(messages)),
            }
        elif kind == MessageType.EVALUATE and self.current is not None:
            evaluated = tally(replies, len(messages))
            self.current.update(fed_clients=evaluated["num_clients"])
            self.current.update(fed_failures=evaluated["failures"])
        return replies

    def finish(self) -> None:
        """Close the round in progress (at the next round, or when the ServerApp returns)."""
        if self.current is None:
            return
        record, self.current = self.current, None
        record["seconds"] = time.perf_counter() - self.started
        self.records.append(record)
        atomic_write_bytes(self.out / "history.json", json.dumps(self.records, indent=1).encode())
        console.print(
            f"round {record['round']}  clients {record['num_clients']} "
            f"({record['failures']} failed)  {record['seconds']:.2f} s"
        )


def tally(replies: list[Message], sent: int) -> dict[str, Any]:
    """Replies with content, and failures (error replies and messages never answered)."""
    reasons = failure_reasons(replies)
    return {
        "num_clients": len(replies) - len(reasons),
        "failures": sent - len(replies) + len(reasons),
        "failure_reasons": reasons,
    }
