"""Every touch of Flower internals that a simulation Grid needs, in one place.

fedge's own Grids run Flower's ServerApp code without a SuperLink, so they must do two
things Flower's SuperLink does and does not expose publicly: give the server process a
task identity (run id, the SuperLink's node id) so that `Message(...)` can be built, and
stamp each instruction with a message id. `self_test()` checks both against the installed
Flower; a Flower upgrade that moves them breaks here, loudly, and nowhere else.
"""

from __future__ import annotations

import uuid

from flwr.app import Error, Message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.task_identity import TaskIdentity

__all__ = [
    "SUPERLINK_NODE_ID",
    "ErrorCode",
    "assign_message_id",
    "claim_server_identity",
    "error_reply",
    "self_test",
]


def claim_server_identity(run_id: int) -> None:
    """Act as the SuperLink-side ServerApp task of `run_id` in this process."""
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def assign_message_id(message: Message) -> str:
    """Give an instruction message a fresh id, as Flower's grids do on push."""
    message_id = uuid.uuid4().hex
    message.metadata.__dict__["_message_id"] = message_id
    return message_id


def error_reply(
    message: Message, reason: str, code: int = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
) -> Message:
    """A reply carrying an error instead of content, as Flower's SuperNode sends."""
    return Message(Error(code=code, reason=reason), reply_to=message)


def self_test() -> None:
    """Raise RuntimeError if this Flower no longer supports what fedge's grids rely on."""
    from flwr.app import ConfigRecord, RecordDict

    try:
        claim_server_identity(run_id=7)
        msg = Message(RecordDict({"c": ConfigRecord({"x": 1})}), 2, "train")
        mid = assign_message_id(msg)
        reply = Message(RecordDict(), reply_to=msg)
        ok = (
            msg.metadata.message_id == mid
            and msg.metadata.run_id == 7
            and reply.metadata.reply_to_message_id == mid
            and reply.metadata.src_node_id == 2
        )
    except Exception as exc:  # any failure means the internals moved
        raise RuntimeError(f"fedge's Flower compatibility layer is broken: {exc!r}") from exc
    if not ok:
        raise RuntimeError("fedge's Flower compatibility layer is broken: metadata not as expected")
