"""`python -m fedge.server.superlink ARGS`: Flower's `flower-superlink ARGS`, saying on its
console (the run's `superlink.log`, which `fedge server` echoes) when it refuses a device
whose key is not enrolled (Flower tells only the device), keeping the arrays of messages
in flight in memory, not in `--database` (`fedge.compat.keep_objects_in_memory`), and
holding a request for a message, a reply or an object until it is there instead of having
the asker poll (`fedge.compat.hold_superlink_polls`), and checking a run's status once per
quarter second rather than on every object (`fedge.compat.cache_run_checks`)."""

from __future__ import annotations

from fedge import compat
from fedge.edge.poll import Waits

REFUSAL = "fedge server: "  # the prefix `fedge server` echoes from superlink.log


def main() -> None:
    compat.report_refused_nodes(lambda why: print(REFUSAL + why, flush=True))
    compat.keep_objects_in_memory()
    compat.cache_run_checks()
    waits = Waits()
    compat.hold_superlink_polls(waits.hold, waits.notify)
    from flwr.superlink.cli import flower_superlink

    flower_superlink()


if __name__ == "__main__":
    main()
