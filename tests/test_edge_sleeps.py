"""The edge runtime's removal of Flower's fixed sleeps, checked on the installed Flower in a
fresh interpreter (the patches change Flower's modules for the whole process)."""

import subprocess
import sys

PATCHED_SUPERNODE = """
import time
import flwr.supernode.start_client_internal as sci
from fedge.edge.supernode import prepare

prepare()
t = time.perf_counter(); sci.time.sleep(3); idle = time.perf_counter() - t
t = time.perf_counter(); sci.time.sleep(0.5); reply = time.perf_counter() - t
fast = sci.pull_objects.keywords
print(idle, reply, fast["initial_backoff"], fast["backoff_cap"])
"""


def test_supernode_sleeps_and_object_retries_are_short_in_fedges_supernode():
    done = subprocess.run(
        [sys.executable, "-c", PATCHED_SUPERNODE], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    idle, reply, first_retry, cap = map(float, done.stdout.split())
    assert idle < 0.5 and reply < 0.25  # Flower: 3 s and 0.5 s
    assert first_retry <= 0.01 and cap <= 0.1  # Flower: 1 s, doubling to 10 s


def test_grid_retries_objects_quickly_after_prompt_grid_wraps_it():
    code = (
        "import flwr.superlink.grid.http_grid as g\n"
        "from fedge.server.polling import PromptGrid\n"
        "PromptGrid(None)\n"
        "print(g.pull_objects.keywords['initial_backoff'], g.pull_objects.keywords['backoff_cap'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    first_retry, cap = map(float, done.stdout.split())
    assert first_retry <= 0.01 and cap <= 0.1
