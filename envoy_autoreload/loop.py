"""The reactor: one `selectors` loop in the main thread that turns everything into events.

Signals, readable fds (a child's stderr, later inotify) and monotonic deadlines all
come out of `Reactor.poll()` as typed events; the supervisor consumes them and owns
every piece of state. Nothing else runs code on its behalf.

Design notes
- A signal handler does exactly two things: add the signal to a set and write one
  meaningless byte to the doorbell socket. The set, not the bytes, says which signals
  arrived, so a flood can neither overflow a buffer nor lose a SIGTERM. asyncio's
  `add_signal_handler` reads signal numbers back from the wakeup bytes and can drop one
  when the pipe is full (python/cpython#74224); gunicorn's old self-pipe dropped the
  sixth signal outright. Ten HUPs become one, as in the kernel (trio's design).
- `signal.set_wakeup_fd` points at the same socket so that a signal which lands while
  another thread runs (the watchdog observer) still wakes `select`.
- There is no tick: `select` sleeps until the nearest deadline, or forever when idle.
- Each turn is timed, from `select` returning to the next `select` call: the longest
  an event that became ready meanwhile waited to be looked at (`on_busy`, exported as
  `envoy_autoreload_loop_busy_seconds`). Two clock reads per turn and nothing while
  idle: no timer, no wakeup of its own.
- Rejected: signalfd (Linux only, and every thread must block the signals first) and
  asyncio (its child watchers and signal plumbing are the parts we need to control).
"""

from __future__ import annotations

import contextlib
import math
import selectors
import signal
import socket
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from types import FrameType

from envoy_autoreload.signal_mask import SIGNAL_PRIORITY


@dataclass(frozen=True, slots=True)
class SignalReceived:
    signum: signal.Signals


@dataclass(frozen=True, slots=True)
class FdReady:
    key: Hashable


@dataclass(frozen=True, slots=True)
class DeadlineReached:
    key: Hashable


Event = SignalReceived | FdReady | DeadlineReached

Clock = Callable[[], float]
BusyObserver = Callable[[float], None]


class Reactor:
    """Owns the selector, the doorbell socket pair, the pending-signal set and deadlines."""

    def __init__(
        self,
        signals: Iterable[signal.Signals] = SIGNAL_PRIORITY,
        on_busy: BusyObserver | None = None,
    ) -> None:
        """`on_busy` is told, before each `select` but the first, how long the turn
        since the previous one returned took (seconds)."""
        self._clock: Clock = time.monotonic
        self._on_busy = on_busy
        self._woke_at: float | None = None  # when `select` last returned
        self._selector = selectors.DefaultSelector()
        self._bell_read, self._bell_write = socket.socketpair()
        self._bell_read.setblocking(False)
        self._bell_write.setblocking(False)
        self._selector.register(self._bell_read, selectors.EVENT_READ, None)
        self._pending: set[signal.Signals] = set()
        self._deadlines: dict[Hashable, float] = {}
        self._signals = tuple(signals)
        self._previous_handlers: dict[signal.Signals, object] = {}
        self._previous_wakeup_fd: int | None = None

    # -- lifecycle -------------------------------------------------------------
    def __enter__(self) -> Reactor:
        self._previous_wakeup_fd = signal.set_wakeup_fd(
            self._bell_write.fileno(), warn_on_full_buffer=False
        )
        for signum in self._signals:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        # A re-exec blocks these across `execve` (reexec.py): what arrived in the window
        # is pending, and is delivered to the handlers just installed.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self._signals)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous_handlers.clear()
        if self._previous_wakeup_fd is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            self._previous_wakeup_fd = None
        self._selector.close()
        self._bell_read.close()
        self._bell_write.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Record the signal and ring the doorbell; nothing else may happen here."""
        self._pending.add(signal.Signals(signum))
        self.ring()

    def ring(self) -> None:
        """Wake `poll()`; safe from a signal handler or another thread."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            # A full socket already means "wake up"; the byte's value means nothing.
            self._bell_write.send(b"\0")

    def take_pending(self) -> set[signal.Signals]:
        """Signals received but not yet handled, taken out (a re-exec raises them again,
        blocked, so the next image handles them)."""
        pending, self._pending = self._pending, set()
        return pending

    # -- registration ----------------------------------------------------------
    def add_reader(self, fd: int, key: Hashable) -> None:
        self._selector.register(fd, selectors.EVENT_READ, key)

    def remove_reader(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)

    def now(self) -> float:
        return self._clock()

    def set_deadline(self, key: Hashable, at: float) -> None:
        self._deadlines[key] = at

    def set_timeout(self, key: Hashable, after_s: float) -> None:
        self._deadlines[key] = self._clock() + max(0.0, after_s)

    def cancel(self, key: Hashable) -> None:
        self._deadlines.pop(key, None)

    def has_deadline(self, key: Hashable) -> bool:
        return key in self._deadlines

    # -- the loop --------------------------------------------------------------
    def poll(self) -> list[Event]:
        """Block until something happens; return what happened, signals first."""
        timeout = self._timeout()
        if self._woke_at is not None and self._on_busy is not None:
            self._on_busy(self._clock() - self._woke_at)
        ready = self._select(timeout)
        self._woke_at = self._clock()
        fd_events: list[Event] = []
        for selector_key, _mask in ready:
            if selector_key.fileobj is self._bell_read:
                self._drain_doorbell()
            else:
                fd_events.append(FdReady(selector_key.data))
        pending, self._pending = self._pending, set()
        ordered = sorted(pending, key=_signal_rank)
        events: list[Event] = [SignalReceived(s) for s in ordered]
        events.extend(fd_events)
        now = self._clock()
        for key, at in sorted(self._deadlines.items(), key=lambda item: item[1]):
            if at <= now:
                events.append(DeadlineReached(key))
        return events

    def claim(self, event: DeadlineReached) -> bool:
        """True, once, if the deadline is still armed and due when the event is handled.

        Events of one `poll()` are handled in order, and an earlier one may cancel or
        re-arm a deadline (a reaped child, then a new one started with a fresh start
        deadline); acting on the stale event would kill the new child.
        """
        at = self._deadlines.get(event.key)
        if at is None or at > self._clock():
            return False
        del self._deadlines[event.key]
        return True

    def _select(self, timeout: float | None) -> list[tuple[selectors.SelectorKey, int]]:
        """`select`, with deadlines met to a fraction of a millisecond: epoll waits whole
        milliseconds, rounded up (0.7 ms late on average, on the path from a settled
        burst to its restart: issue 16). It waits the whole milliseconds, sleeps what
        is left if nothing woke it, then looks at the descriptors once more."""
        if timeout is None or timeout <= 0:
            return self._selector.select(timeout)
        until = self._clock() + timeout
        whole_ms = math.floor(timeout * 1000)
        if whole_ms > 0:
            # Just under the whole milliseconds: the selector rounds up to the next one.
            ready = self._selector.select((whole_ms - 0.5) / 1000)
            if ready:
                return ready
        left = until - self._clock()
        if left > 0:
            time.sleep(left)
        return self._selector.select(0)

    def _timeout(self) -> float | None:
        if self._pending:
            return 0.0
        if not self._deadlines:
            return None
        return max(0.0, min(self._deadlines.values()) - self._clock())

    def _drain_doorbell(self) -> None:
        while True:
            try:
                if not self._bell_read.recv(4096):
                    return
            except (BlockingIOError, InterruptedError):
                return


def _signal_rank(signum: signal.Signals) -> int:
    try:
        return SIGNAL_PRIORITY.index(signum)
    except ValueError:
        return len(SIGNAL_PRIORITY)
