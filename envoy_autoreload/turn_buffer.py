"""Holding one loop turn's log records until the turn ends (logs.batched_output).

A module of its own because it builds on `logging.handlers`, whose import (with
`socket` and `pickle`) costs 10 ms on these machines: logs.py installs it at the loop's
first turn, not before the start-up check has started (issue 16).
"""

from __future__ import annotations

import logging
import logging.handlers
from typing import Final

MAX_TURN_RECORDS: Final = 256  # a turn that logs more writes them in chunks


class TurnBuffer(logging.handlers.MemoryHandler):
    """Holds the records of one loop turn and hands them to `target` when it ends
    (`batched_output`); outside a turn, each at once. A record keeps the time it was
    logged at; only its formatting and writing wait.

    Why: on the way from a burst's deadline to the spawn the loop logs two or three
    lines, and after an idle second each costs 0.4-0.9 ms to format on these
    machines (cold caches: 60 us warm), a third of that path (issue 16). Formatted
    after the turn's spawn, they cost the restart nothing."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__(MAX_TURN_RECORDS, logging.CRITICAL + 1, target)
        self.holding = False

    def shouldFlush(self, record: logging.LogRecord) -> bool:
        return not self.holding or len(self.buffer) >= self.capacity
