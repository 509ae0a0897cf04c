"""`python -m fedge.edge.supernode ARGS`: Flower's `flower-supernode ARGS`, without its fixed
sleeps. After a pull that brought no message it waits 10 ms, growing to 250 ms while the
federation is idle (Flower: 3 s every time); it looks for the ClientApp's reply every 5 ms
(Flower: 0.5 s); it retries an object not uploaded yet after 5 ms (Flower: 1 s, 2 s, ...).
Everything else, the protocol, TLS and authentication included, is Flower's.
"""

from __future__ import annotations

from fedge import compat
from fedge.edge.poll import Backoff

IDLE = Backoff(low=0.01, high=0.25, factor=1.25)
REPLY_POLL = 0.005


def prepare() -> None:
    """Patch this process's Flower SuperNode as the module docstring says."""
    compat.patch_supernode_sleeps(IDLE.wait, IDLE.reset, reply_poll=REPLY_POLL)
    compat.patch_object_pulls("flwr.supernode.start_client_internal")


def main() -> None:
    prepare()
    from flwr.supernode.cli import flower_supernode

    flower_supernode()


if __name__ == "__main__":
    main()
