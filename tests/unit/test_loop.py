"""The reactor with real signals sent to this process: nothing lost, nothing duplicated."""

from __future__ import annotations

import os
import signal
import threading
import time

from envoy_autoreload.loop import DeadlineReached, FdReady, Reactor, SignalReceived


def test_a_flood_of_hups_is_one_event_and_a_term_inside_it_is_never_lost() -> None:
    with Reactor() as reactor:
        for i in range(2000):
            os.kill(os.getpid(), signal.SIGHUP)
            if i == 1000:
                os.kill(os.getpid(), signal.SIGTERM)
        events = reactor.poll()
    assert events[0] == SignalReceived(signal.SIGTERM), "stopping is handled first"
    assert events.count(SignalReceived(signal.SIGHUP)) == 1
    assert len(events) == 2


def test_handlers_are_restored_on_close() -> None:
    before = signal.getsignal(signal.SIGHUP)
    with Reactor():
        assert signal.getsignal(signal.SIGHUP) is not before
    assert signal.getsignal(signal.SIGHUP) is before


def test_idle_poll_blocks_until_woken() -> None:
    with Reactor() as reactor:
        timer = threading.Timer(0.3, reactor.ring)
        timer.start()
        started = time.monotonic()
        events = reactor.poll()
        timer.join()
    assert events == []
    assert time.monotonic() - started >= 0.25, "with no deadline, poll() must sleep"


def test_deadlines_fire_in_order_and_can_be_cancelled() -> None:
    with Reactor() as reactor:
        reactor.set_timeout("late", 0.05)
        reactor.set_timeout("early", 0.0)
        reactor.set_timeout("cancelled", 0.0)
        reactor.cancel("cancelled")
        seen: list[object] = []
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            for event in reactor.poll():
                if isinstance(event, DeadlineReached) and reactor.claim(event):
                    seen.append(event.key)
        assert seen == ["early", "late"]
        assert not reactor.has_deadline("late")


def test_a_deadline_re_armed_before_its_event_is_handled_is_not_claimed() -> None:
    with Reactor() as reactor:
        reactor.set_timeout("start", 0.0)
        events = [e for e in reactor.poll() if isinstance(e, DeadlineReached)]
        assert events == [DeadlineReached("start")]
        reactor.set_timeout("start", 60.0)  # what handling an earlier event did
        assert not reactor.claim(events[0])
        assert reactor.has_deadline("start")


def test_readable_fd_is_reported_with_its_key() -> None:
    read_fd, write_fd = os.pipe()
    try:
        with Reactor() as reactor:
            reactor.add_reader(read_fd, "pipe")
            os.write(write_fd, b"x")
            assert reactor.poll() == [FdReady("pipe")]
            reactor.remove_reader(read_fd)
    finally:
        os.close(read_fd)
        os.close(write_fd)
