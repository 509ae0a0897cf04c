"""Waits that start short after activity and grow while nothing happens (no fixed sleep)."""

from __future__ import annotations

import time


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
