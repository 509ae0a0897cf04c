"""The edge runtime's removal of Flower's fixed sleeps, checked on the installed Flower in a
fresh interpreter (the patches change Flower's modules for the whole process), and the held
requests that replace polling."""

import subprocess
import sys
import threading
import time

from fedge.edge.poll import Waits

PATCHED_SUPERNODE = """
import time
import flwr.supernode.start_client_internal as sci
from fedge.edge.supernode import REPLIED, prepare

prepare()
t = time.perf_counter(); sci.time.sleep(3); idle = time.perf_counter() - t
REPLIED.set()  # what the runtime's push of a reply does
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
    assert idle < 0.5 and reply < 0.1  # Flower: 3 s, and 0.5 s after the reply came
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


def held(waits: Waits, key: str, box: list) -> tuple[list, float]:
    """What `waits.hold` answers for `key` (the contents of `box`) and how long it took."""
    start = time.perf_counter()
    answer = waits.hold(key, lambda: list(box), lambda got: not got)
    return answer, time.perf_counter() - start


def test_a_held_request_is_answered_when_its_thing_arrives_and_not_before():
    waits, box = Waits(hold_s=5.0), []

    def arrive() -> None:
        time.sleep(0.3)
        waits.notify(["other"])  # wakes nobody: nothing for "mine" yet
        time.sleep(0.2)
        box.append("message")
        waits.notify(["mine"])

    threading.Thread(target=arrive).start()
    answer, took = held(waits, "mine", box)
    assert answer == ["message"] and 0.45 < took < 2.0


def test_a_held_request_gives_up_after_its_hold_and_beyond_the_holders_none_waits():
    waits = Waits(hold_s=0.4, holders=1)
    results: list[float] = []
    first = threading.Thread(target=lambda: results.append(held(waits, "a", [])[1]))
    first.start()
    time.sleep(0.1)
    answer, took = held(waits, "b", [])  # the one slot is taken: answered at once
    first.join()
    assert answer == [] and took < 0.1
    assert 0.35 < results[0] < 2.0
    answer, took = held(waits, "c", ["there"])  # something there: never held
    assert answer == ["there"] and took < 0.1
    assert not waits._notified and not waits._waiting  # nobody left registered
