"""Retry pacing and the crash budget; pure, the clock is passed in.

Two policies, both from the restarter-core contract:
- a failed hot restart retries the *same* epoch (ENVOY_FACTS §4) a few times with a
  short backoff, because a port can be held for a moment, then waits for the next
  request: never loop on one failure;
- when nothing serves, cold starts back off 1 s doubling to 30 s, and five failures
  within five minutes end the daemon with exit 1 so the process manager takes over
  (supervisor's "exited too quickly" idea, with a window instead of a counter);
- the serving Envoy's death is met at once, unless it is another quick death in a row
  (less than 10 s after LIVE): an Envoy that keeps dying soon after LIVE is a crash
  loop, not bad luck, and backs off like a failed cold start.
"""

from __future__ import annotations

import collections
from typing import Final

HOT_RESTART_RETRIES: Final = 3
HOT_RETRY_FIRST_S: Final = 1.0
COLD_BACKOFF_FIRST_S: Final = 1.0
COLD_BACKOFF_CAP_S: Final = 30.0
CRASH_BUDGET_FAILURES: Final = 5
CRASH_BUDGET_WINDOW_S: Final = 300.0
STABLE_SERVING_S: Final = 10.0


def exponential_delay(failures: int, first_s: float, cap_s: float) -> float:
    """Delay before the next attempt after `failures` consecutive failures (>= 1)."""
    return float(min(cap_s, first_s * 2 ** max(0, failures - 1)))


class CrashBudget:
    """Counts failures in a sliding window; `record` answers whether the budget is spent."""

    def __init__(
        self, max_failures: int = CRASH_BUDGET_FAILURES, window_s: float = CRASH_BUDGET_WINDOW_S
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: collections.deque[float] = collections.deque()

    def record(self, now: float) -> bool:
        self._failures.append(now)
        while self._failures and self._failures[0] <= now - self.window_s:
            self._failures.popleft()
        return len(self._failures) >= self.max_failures

    def export(self) -> list[float]:
        return list(self._failures)

    def restore(self, failures: list[float]) -> None:
        self._failures = collections.deque(sorted(failures))

    def recent(self, now: float) -> int:
        return sum(1 for at in self._failures if at > now - self.window_s)


class DeathPacing:
    """How soon to start again after the serving Envoy died.

    A death after at least `stable_s` of serving is met at once, and so is the first
    quick one: the outage is already on. Each further quick death in a row (an Envoy
    that dies soon after LIVE: a crash loop) waits 1 s, doubling to 30 s. A row ends
    with a stable death, or when the last death is older than the crash budget's window.
    """

    def __init__(
        self, stable_s: float = STABLE_SERVING_S, forget_s: float = CRASH_BUDGET_WINDOW_S
    ) -> None:
        self.stable_s = stable_s
        self.forget_s = forget_s
        self._quick_in_a_row = 0
        self._last_death_at: float | None = None

    def export(self) -> dict[str, float | int | None]:
        return {"quick_in_a_row": self._quick_in_a_row, "last_death_at": self._last_death_at}

    def restore(self, saved: dict[str, object]) -> None:
        quick, last = saved.get("quick_in_a_row"), saved.get("last_death_at")
        self._quick_in_a_row = quick if isinstance(quick, int) else 0
        self._last_death_at = float(last) if isinstance(last, int | float) else None

    def delay_after(self, served_s: float, now: float) -> float:
        last, self._last_death_at = self._last_death_at, now
        if last is not None and now - last > self.forget_s:
            self._quick_in_a_row = 0
        if served_s >= self.stable_s:
            self._quick_in_a_row = 1
            return 0.0
        self._quick_in_a_row += 1
        if self._quick_in_a_row == 1:
            return 0.0
        return exponential_delay(self._quick_in_a_row - 1, COLD_BACKOFF_FIRST_S, COLD_BACKOFF_CAP_S)
