"""Helpers of the fault-injection tests: a run's rounds."""

import json
from pathlib import Path


def rounds_of(out) -> list[int]:
    return [r["round"] for r in json.loads((Path(out) / "history.json").read_text())]


def wait_until(check, timeout: float, what: str, proc=None):
    """Poll `check()` until it is truthy (returned); fail naming `what` after `timeout` s,
    or as soon as `proc` (a process that must stay up meanwhile) has exited."""
    import time

    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert proc is None or proc.poll() is None, f"exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.2)
    return value


def device_pids(log) -> tuple[int, int]:
    """(SuperNode pid, first runtime pid) a `fedge client` printed in its log `log`."""
    import re

    found = re.search(r"SuperNode pid (\d+), runtime pid (\d+)", Path(log).read_text())
    return (int(found[1]), int(found[2])) if found else (0, 0)


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` now, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def history_of(out) -> list[dict]:
    path = Path(out) / "history.json"
    return json.loads(path.read_text()) if path.exists() else []
