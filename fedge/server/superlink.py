"""`python -m fedge.server.superlink ARGS`: Flower's `flower-superlink ARGS`, saying on its
console (the run's `superlink.log`, which `fedge server` echoes) when it refuses a device
whose key is not enrolled (Flower tells only the device), and keeping the arrays of messages
in flight in memory, not in `--database` (`fedge.compat.keep_objects_in_memory`)."""

from __future__ import annotations

from fedge import compat

REFUSAL = "fedge server: "  # the prefix `fedge server` echoes from superlink.log


def main() -> None:
    compat.report_refused_nodes(lambda why: print(REFUSAL + why, flush=True))
    compat.keep_objects_in_memory()
    from flwr.superlink.cli import flower_superlink

    flower_superlink()


if __name__ == "__main__":
    main()
