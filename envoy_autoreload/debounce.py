"""Turning a burst of file events into one restart request; pure, the clock is passed in.

A request is due once events have been quiet for `quiet_s`, but never later than
`max_wait_s` after the first event of the burst, so a push writing 500 files is one
restart and an endless trickle of writes still restarts (watchfiles' step/debounce
pair; watchdog's debouncer has no maximum and a steady writer starves it).
"""

from __future__ import annotations


class Debouncer:
    def __init__(self, quiet_s: float, max_wait_s: float) -> None:
        self.quiet_s = quiet_s
        self.max_wait_s = max(max_wait_s, quiet_s)
        self._first_at: float | None = None
        self._last_at: float | None = None
        self._paths: set[str] = set()
        self.events_seen = 0

    def add(self, now: float, paths: set[str]) -> None:
        if self._first_at is None:
            self._first_at = now
        self._last_at = now
        self._paths |= paths
        self.events_seen += len(paths)

    def deadline(self) -> float | None:
        """When the burst is due, or None when nothing is pending."""
        if self._first_at is None or self._last_at is None:
            return None
        return min(self._last_at + self.quiet_s, self._first_at + self.max_wait_s)

    def is_due(self, now: float) -> bool:
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def take(self) -> set[str]:
        """The paths of the settled burst; the debouncer is empty afterwards."""
        paths, self._paths = self._paths, set()
        self._first_at = self._last_at = None
        return paths
