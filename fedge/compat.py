"""Every touch of Flower internals fedge needs, in one place, each covered by `self_test()`.

fedge's own Grids run Flower's ServerApp code without a SuperLink, so they must do what
Flower's SuperLink does and does not expose publicly: give the server process a task
identity (run id, the SuperLink's node id) so that `Message(...)` can be built, and stamp
each instruction with a message id. fedge's strategies use Flower's weighted aggregation of
ArrayRecords (SCAFFOLD), its RDP accountant and the config key its client-side DP wrapper
sends (differential privacy). None of these is in Flower's public API; a Flower upgrade that
moves one breaks `self_test()` here, loudly, and nowhere else.
"""

from __future__ import annotations

import uuid
from typing import cast

from flwr.app import Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = [
    "KEY_CLIPPING_NORM",
    "SUPERLINK_NODE_ID",
    "ErrorCode",
    "NeighboringRelation",
    "Run",
    "PrivacyConfig",
    "RdpAccountant",
    "SamplingMethod",
    "aggregate_arrayrecords",
    "assign_message_id",
    "claim_server_identity",
    "empty_run",
    "error_reply",
    "self_test",
    "set_message_id",
]


def claim_server_identity(run_id: int) -> None:
    """Act as the SuperLink-side ServerApp task of `run_id` in this process."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def empty_run(run_id: int) -> Run:
    """The `Run` a Grid reports for a run fedge started without a SuperLink."""
    return Run.create_empty(run_id)


def assign_message_id(message: Message) -> str:
    """Give an instruction message a fresh id, as Flower's grids do on push."""
    message_id = uuid.uuid4().hex
    set_message_id(message, message_id)
    return message_id


def set_message_id(message: Message, message_id: str) -> None:
    """Stamp `message` with `message_id` (a Ray actor rebuilds the driver's instruction)."""
    message.metadata.__dict__["_message_id"] = message_id


def error_reply(
    message: Message, reason: str, code: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
) -> Message:
    """A reply carrying an error instead of content, as Flower's SuperNode sends."""
    return Message(Error(code=code, reason=reason), reply_to=message)


def self_test() -> None:
    """Raise RuntimeError if this Flower no longer supports what fedge relies on."""
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

    try:
        claim_server_identity(run_id=7)
        msg = Message(RecordDict({"c": ConfigRecord({"x": 1})}), 2, "train")
        mid = assign_message_id(msg)
        reply = Message(RecordDict(), reply_to=msg)
        ids_ok = (
            empty_run(7).run_id == 7
            and msg.metadata.message_id == mid
            and msg.metadata.run_id == 7
            and reply.metadata.reply_to_message_id == mid
            and reply.metadata.src_node_id == 2
        )
        records = [
            RecordDict({"a": ArrayRecord([np.full(2, v)]), "m": MetricRecord({"n": n})})
            for v, n in ((1.0, 1), (4.0, 2))
        ]
        mean = aggregate_arrayrecords(records, "n").to_numpy_ndarrays()[0]
        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=1e-5,
                population_size=10,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
        dp = DifferentialPrivacyClientSideFixedClipping(
            FedAvg(), 1.0, 0.5, 2, accountant=accountant
        )
        nodes = cast(Grid, _Nodes())
        sent = next(iter(dp.configure_train(1, ArrayRecord([np.zeros(2)]), ConfigRecord(), nodes)))
        dp_ok = sent.content.config_records["config"][KEY_CLIPPING_NORM] == 0.5
    except Exception as exc:  # any failure means the internals moved
        raise RuntimeError(f"fedge's Flower compatibility layer is broken: {exc!r}") from exc
    if not ids_ok:
        raise RuntimeError("fedge's Flower compatibility layer is broken: metadata not as expected")
    if not np.allclose(mean, 3.0):
        raise RuntimeError(f"Flower's aggregate_arrayrecords no longer weights: {mean}")
    if not dp_ok:
        raise RuntimeError(f"Flower's client-side DP no longer sends {KEY_CLIPPING_NORM!r}")


class _Nodes:
    """The least of a Grid that a strategy's configure_train asks for (self_test only)."""

    def get_node_ids(self) -> list[int]:
        return [2, 3]

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id)
