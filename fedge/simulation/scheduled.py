"""A LocalGrid whose simulated devices run real-time scenarios beside federated training.

Before a device trains in a round, its on-device scheduler runs the device's scenario for
one window of device time with training beside it (`fedge.edge.cosched`): the training
steps it grants become the round's step budget, sent in the node config the ClientApp reads
(`max-train-steps`), so the client trains exactly that many steps. A device granted no step
sits the round out with an error reply saying so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import Message, MessageType
from flwr.clientapp import ClientApp

from fedge.compat import error_reply
from fedge.edge.cosched import run
from fedge.edge.device import Device
from fedge.edge.scheduler import load_scheduler
from fedge.edge.xrbench import Scenario
from fedge.simulation.local_grid import LocalGrid
from fedge.wire import CONFIG, NODE_MAX_TRAIN_STEPS, SERVER_ROUND, number


@dataclass(frozen=True)
class SimulatedDevice:
    """A device of the population: its scenario, hardware, scheduler and training mode
    ("slack": the scheduler places steps; "always": training ignores the scenario)."""

    scenario: Scenario
    device: Device
    scheduler: str = "dream"
    training: str = "slack"


class ScheduledGrid(LocalGrid):
    """LocalGrid where partition i is `devices[i]`; `log` keeps each grant and its score."""

    def __init__(
        self,
        client_app: ClientApp,
        devices: Sequence[SimulatedDevice],
        window_ms: float = 1000.0,
        run_id: int = 1,
    ) -> None:
        super().__init__(client_app, len(devices), run_id)
        for d in devices:
            load_scheduler(d.scheduler)  # a bad name fails here, not mid-run
        self.devices = list(devices)
        self.window_ms = window_ms
        self.log: list[dict[str, Any]] = []

    def grant(self, pid: int, server_round: int) -> int:
        """Steps device `pid` may train in `server_round`; the log keeps the scenario score
        with that training and without any (same frames), to show what training cost."""
        d = self.devices[pid]
        seed = server_round * 100_003 + pid
        result = run(
            d.scenario, d.device, load_scheduler(d.scheduler), self.window_ms, d.training, seed
        )
        alone = run(d.scenario, d.device, load_scheduler(d.scheduler), self.window_ms, "off", seed)
        self.log.append(
            {
                "round": server_round,
                "device": pid,
                "scenario": d.scenario.name,
                "scheduler": d.scheduler,
                "training": d.training,
                "steps": result.train_steps,
                "score": result.score,
                "score_alone": alone.score,
                "misses": result.misses,
                "drops": result.drops,
            }
        )
        return result.train_steps

    def deliver(self, message: Message) -> Message:
        if message.metadata.message_type != MessageType.TRAIN:
            return super().deliver(message)
        node = message.metadata.dst_node_id
        pid = self.partition_of(node)
        steps = self.grant(
            pid, int(number(message.content.config_records[CONFIG], SERVER_ROUND, 1))
        )
        if steps == 0:
            return error_reply(message, f"device {pid}: its scheduler granted no training step")
        self.context(node).node_config[NODE_MAX_TRAIN_STEPS] = steps
        return super().deliver(message)
