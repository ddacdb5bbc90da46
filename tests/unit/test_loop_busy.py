"""The loop's own stall gauge: each turn is timed from `select` returning to the next
`select`, time blocked in `select` is not busy time, and the figures reach /metrics."""

from __future__ import annotations

import os
import threading
import time

from envoy_autoreload.loop import FdReady, Reactor
from envoy_autoreload.telemetry import Telemetry


def _work_for(seconds: float) -> None:
    """A handler that keeps the loop's thread busy (a parse, a walk), not a wait."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass


def test_a_slow_turn_is_reported_and_time_blocked_in_select_is_not() -> None:
    turns: list[float] = []
    with Reactor(on_busy=turns.append) as reactor:
        reactor.ring()
        reactor.poll()
        assert turns == [], "before the first select there is no turn to time"
        _work_for(0.15)  # the first poll's events take this long to handle
        timer = threading.Timer(0.3, reactor.ring)
        timer.start()
        reactor.poll()  # reports the slow turn, then blocks until the ring
        timer.join()
        reactor.ring()
        reactor.poll()  # reports the turn after the idle wait: a short one
    assert len(turns) == 2
    assert turns[0] >= 0.15
    assert turns[1] < 0.1, "time blocked in select (0.3 s here) is idle, not busy"


def test_an_fd_that_became_ready_during_a_turn_waited_at_most_that_turn() -> None:
    turns: list[float] = []
    read_fd, write_fd = os.pipe()
    try:
        with Reactor(on_busy=turns.append) as reactor:
            reactor.ring()
            reactor.poll()
            reactor.add_reader(read_fd, "pipe")
            _work_for(0.1)
            os.write(write_fd, b"x")  # ready while the loop is still busy
            _work_for(0.1)
            events = reactor.poll()
    finally:
        os.close(read_fd)
        os.close(write_fd)
    assert FdReady("pipe") in events
    assert turns and turns[-1] >= 0.2


def test_turns_reach_the_histogram_and_the_maximum_gauge() -> None:
    telemetry = Telemetry()
    for busy_s in (0.0004, 0.03, 0.2, 0.004):
        telemetry.loop_turned(busy_s)
    sample = telemetry.registry.get_sample_value
    assert sample("envoy_autoreload_loop_busy_seconds_count") == 4
    assert sample("envoy_autoreload_loop_busy_seconds_bucket", {"le": "0.001"}) == 1
    assert sample("envoy_autoreload_loop_busy_seconds_bucket", {"le": "0.05"}) == 3
    assert sample("envoy_autoreload_loop_busy_max_seconds") == 0.2
