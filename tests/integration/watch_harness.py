"""Drive a real ChangeDetector on real files, as the daemon's loop would."""

from __future__ import annotations

import select
import time

from envoy_autoreload.watch.changes import ChangeDetector, SettledBurst


def next_burst(detector: ChangeDetector, timeout_s: float = 15.0) -> SettledBurst | None:
    """Block (with select, like the daemon) until a burst settles or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = time.monotonic()
        if now >= deadline:
            return None
        due = detector.deadline()
        wait = deadline - now if due is None else max(0.0, min(due, deadline) - now)
        readable, _, _ = select.select([detector.fileno()], [], [], wait)
        if readable:
            detector.on_readable(time.monotonic())
        burst = detector.settle(time.monotonic())
        if burst is not None:
            return burst
