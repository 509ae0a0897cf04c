"""Waits without fixed sleeps: a poll that starts short after activity and grows while
nothing happens (`Backoff`), and requests held until what they ask for arrives (`Waits`)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

T = TypeVar("T")


class Backoff:
    """`wait()` sleeps `low` seconds, then `factor` times longer each time up to `high`;
    `reset()` after something happened makes the next wait short again."""

    def __init__(self, low: float = 0.005, high: float = 0.2, factor: float = 1.3) -> None:
        if not 0 < low <= high:
            raise ValueError(f"Backoff: need 0 < low <= high, got {low}, {high}")
        self.low, self.high, self.factor = low, high, factor
        self.delay = low

    def wait(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.high, self.delay * self.factor)

    def reset(self) -> None:
        self.delay = self.low


class Waits:
    """Requests that would be told "nothing yet" wait here instead, until what they ask for
    arrives. A server handler asks `hold(key, call, is_empty)`: it calls `call()`, and while
    the answer `is_empty`, waits up to `hold_s` seconds for `notify([key, ...])` (made by the
    handler that brings the thing) and calls again. Only `holders` requests wait at once (each
    holds a server thread); beyond them an empty answer goes back at once, as before."""

    def __init__(self, hold_s: float = 2.0, holders: int = 16) -> None:
        self.hold_s = hold_s
        self._changed = threading.Condition()
        self._notified: dict[Hashable, int] = {}  # key -> notifications, while anyone waits
        self._waiting: Counter[Hashable] = Counter()
        self._slots = threading.BoundedSemaphore(holders)

    def hold(self, key: Hashable, call: Callable[[], T], is_empty: Callable[[T], bool]) -> T:
        with self._changed:  # registered before the first call: nothing can slip past
            self._waiting[key] += 1
            seen = self._notified.setdefault(key, 0)

        def changed(seen: int) -> Callable[[], bool]:
            return lambda: self._notified[key] != seen

        try:
            answer = call()
            if not is_empty(answer) or not self._slots.acquire(blocking=False):
                return answer
            try:
                deadline = time.monotonic() + self.hold_s
                while is_empty(answer):
                    with self._changed:
                        left = deadline - time.monotonic()
                        if left <= 0 or not self._changed.wait_for(changed(seen), left):
                            return answer
                        seen = self._notified[key]
                    answer = call()
                return answer
            finally:
                self._slots.release()
        finally:
            with self._changed:
                self._waiting[key] -= 1
                if not self._waiting[key]:
                    del self._waiting[key], self._notified[key]

    def notify(self, keys: Iterable[Hashable]) -> None:
        with self._changed:
            woken = [key for key in keys if key in self._notified]
            for key in woken:
                self._notified[key] += 1
            if woken:
                self._changed.notify_all()
