"""`python -m fedge.edge.supernode ARGS`: Flower's `flower-supernode ARGS`, without its fixed
sleeps. After a pull that brought no message it waits 10 ms, growing to 250 ms while the
federation is idle (Flower: 3 s every time; a fedge SuperLink holds the pull itself until a
message comes); it looks for the ClientApp's reply as soon as the runtime pushes one
(Flower: every 0.5 s); it retries an object not uploaded yet after 5 ms (Flower: 1 s, 2 s,
...). The runtime's claim of a task is held until a message has arrived with all its
objects, so the runtime neither polls nor pulls objects that are not there yet.
Everything else, the protocol, TLS and authentication included, is Flower's.
"""

from __future__ import annotations

import threading

from fedge import compat
from fedge.edge.poll import Backoff

IDLE = Backoff(low=0.01, high=0.25, factor=1.25)
STORED = threading.Semaphore(0)  # released once per message stored with all its objects
CLAIM_HOLD = 2.0  # seconds a claim waits for one before it looks anyway
REPLIED = threading.Event()  # set when the runtime pushes (part of) a reply
REPLY_HOLD = 0.5  # seconds between looks for a reply while none is pushed


def prepare() -> None:
    """Patch this process's Flower SuperNode as the module docstring says."""

    def on_message() -> None:
        IDLE.reset()
        STORED.release()

    def reply_wait() -> None:
        REPLIED.wait(REPLY_HOLD)
        REPLIED.clear()  # a push after this is kept; one before it, the next look finds

    compat.hold_task_claims(lambda: STORED.acquire(timeout=CLAIM_HOLD))
    compat.wake_on_replies(REPLIED.set)
    compat.patch_supernode_sleeps(IDLE.wait, on_message, reply_wait)
    compat.patch_object_pulls("flwr.supernode.start_client_internal")


def main() -> None:
    prepare()
    from flwr.supernode.cli import flower_supernode

    flower_supernode()


if __name__ == "__main__":
    main()
