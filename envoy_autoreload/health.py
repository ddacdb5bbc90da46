"""Probation's checks of a LIVE generation: admin, listener failures, --health-url.

A new generation that reports LIVE stays on probation for a health window; every round
`HealthProber` observes it once (admin's `/server_info`, the
`listener_manager.listener_create_failure` counter, every --health-url) and hands the
raw `HealthObservation` to the core, whose probation policy decides what it means.

Why it is built this way:

- Every request opens a **fresh connection** and says `Connection: close`. A kept-alive
  connection keeps reaching the *old*, draining process until it exits, and that process
  still says `state: LIVE` on it (../shared/ENVOY_FACTS.md §9, the "hot restart
  mystery"). Fresh connections reach the new epoch within ~60 ms; admin's answer is
  judged by its `restart_epoch` too (§15), which is why the observation carries it.
- The checks run **off the event loop**, on one worker thread. A --health-url may point
  at anything, and a URL that hangs (or an Envoy that is SIGSTOPped, §7) must not stall
  the single-threaded loop that handles signals and children. The worker wakes the loop
  by writing one byte to a pipe whose read end is `fileno()`; `take()` never blocks.
- Admin is asked what probation needs and no more (`fetch_admin_facts`): `/ready` and
  two stats lines, one process answering both, instead of `/server_info`; and `/stats`,
  whose cost grows with the config (every stat is walked), takes at most a twentieth of
  the new Envoy's main thread (`HealthProber._ask_admin`), but in the window's last
  rounds (`final`), which read the listener counter whatever it costs.
- One round at a time: a round begun while one is still running is skipped, never
  queued, so a slow URL cannot build a backlog of stale observations.
- The thread only does socket I/O; it never spawns a process (children are started from
  the main thread, §11).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit, urlunsplit

from envoy_autoreload.addresses import AdminAddress
from envoy_autoreload.admin import EPOCH_STAT, fetch_server_info, parse_counter, stats_path
from envoy_autoreload.signal_mask import signals_blocked

if TYPE_CHECKING:
    from envoy_autoreload.roster import Generation

LISTENER_FAILURES_STAT: Final = "listener_manager.listener_create_failure"
ROUND_STATS_PATH: Final = stats_path(EPOCH_STAT, LISTENER_FAILURES_STAT) + "&usedonly"
# `/stats` may take at most this share of the new Envoy's main thread: a round whose
# stats took S seconds skips them for S * (1 / share - 1) after (big configs only).
_STATS_SHARE: Final = 0.05
_CLOSE_GRACE_S: Final = 0.5  # close() waits at most timeout_s + this for the worker


@dataclass(frozen=True, slots=True)
class UrlResult:
    url: str
    ok: bool
    detail: str  # "HTTP 200", "HTTP 503", "connection refused", "timed out after 1 s"


@dataclass(frozen=True, slots=True)
class HealthObservation:
    """One round of checks of one generation, as seen; what it means is probation's."""

    epoch: int
    pid: int
    admin_state: str | None  # admin's state (LIVE, DRAINING...); None when it did not answer
    admin_epoch: int | None  # the restart epoch admin reported
    listener_create_failures: int | None  # the counter; None when not readable
    urls: tuple[UrlResult, ...]


def parse_health_url(text: str) -> str:
    """A --health-url: `http://HOST[:PORT]/PATH...` (no path means `/`); ValueError with a
    one-line reason otherwise. Plain HTTP only: the checks talk to a local listener."""
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        raise ValueError(f"health URL {text!r} contains whitespace or control characters")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"health URL {text!r} is not http://HOST[:PORT]/PATH ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise ValueError(f"health URL {text!r}: https is not supported, use http://")
    if scheme != "http" or not parts.hostname:
        raise ValueError(f"health URL {text!r} is not http://HOST[:PORT]/PATH")
    if port == 0:
        raise ValueError(f"health URL {text!r}: port 0 cannot be connected to")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"health URL {text!r}: credentials in the URL are not supported")
    if parts.fragment:
        raise ValueError(f"health URL {text!r}: a #fragment is never sent; drop it")
    return urlunsplit(("http", parts.netloc, parts.path or "/", parts.query, ""))


def check_url(url: str, timeout_s: float) -> UrlResult:
    """GET `url` over a new connection that is closed after the answer; 2xx is ok."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout_s)
    except (ValueError, http.client.HTTPException) as exc:
        return UrlResult(url, False, f"bad URL: {exc}")
    try:
        conn.request("GET", target, headers={"Connection": "close"})
        status = conn.getresponse().status
    except TimeoutError:
        return UrlResult(url, False, f"timed out after {timeout_s:g} s")
    except ConnectionRefusedError:
        return UrlResult(url, False, "connection refused")
    except OSError as exc:
        return UrlResult(url, False, exc.strerror or str(exc) or type(exc).__name__)
    except http.client.HTTPException as exc:
        return UrlResult(url, False, f"bad HTTP response ({type(exc).__name__})")
    except ValueError as exc:  # e.g. a host name IDNA cannot encode
        return UrlResult(url, False, f"bad URL: {exc}")
    finally:
        conn.close()
    return UrlResult(url, 200 <= status < 300, f"HTTP {status}")


@dataclass(frozen=True, slots=True)
class AdminFacts:
    """What one round asks admin; None where it did not say."""

    state: str | None
    epoch: int | None
    listener_create_failures: int | None
    stats_s: float | None = None  # how long admin took to answer `/stats`; None: not asked


def fetch_admin_facts(
    address: AdminAddress, timeout_s: float, with_stats: bool = True
) -> AdminFacts:
    """`/ready` (the state), then the epoch gauge and the listener-failure counter from
    admin's text `/stats`, both on one new connection: one process answers all three
    (§9, §15). Without `with_stats`, `/server_info` alone (state and epoch, no counter).

    Why not `/server_info` (and `/stats` on a second connection) every round: it is 124
    KB of JSON here, asked every round (0.5 s, for the whole health window): 3.6 ms of
    the daemon's CPU and 10.5 ms until answered, against 1.3 and 2.9 ms now (measured,
    100 rounds each), on the two cores the next restart starts on (issue 16).

    Why `usedonly`: admin builds the name of, and matches the filter against, every stat
    it keeps; with 5,000 clusters that held Envoy's main thread 97 ms a round, 19 ms
    when the stats never touched are skipped before their names are built (measured,
    Envoy 1.40). A counter never incremented is one of those, so an answer with the
    epoch gauge and without the counter says the counter is 0.

    Why not the `server.state` gauge beside the epoch: a hot-restarted child still
    PRE_INITIALIZING reported it as 0 (LIVE) on Envoy 1.40 here, while `/ready` said 503
    PRE_INITIALIZING. An admin that answers but has no `/ready`, or whose stats matcher
    drops the epoch gauge, is asked `/server_info` after all."""
    if not with_stats:
        return _facts_from_server_info(address, timeout_s, None, None)
    state: str | None = None
    body = ""
    stats_s: float | None = None
    conn = http.client.HTTPConnection(address.host, address.port, timeout=timeout_s)
    try:
        conn.request("GET", "/ready")
        response = conn.getresponse()
        text = response.read().decode(errors="replace").strip()
        state = text if response.status in (200, 503) and text else None
        asked = time.monotonic()
        conn.request("GET", ROUND_STATS_PATH, headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read().decode(errors="replace") if response.status == 200 else ""
        stats_s = time.monotonic() - asked
    except (OSError, http.client.HTTPException):
        if state is None:  # not answering (refused, timed out): not asked twice
            return AdminFacts(None, None, None)
    finally:
        conn.close()
    epoch, failures = parse_counter(body, EPOCH_STAT), parse_counter(body, LISTENER_FAILURES_STAT)
    if failures is None and epoch is not None:
        failures = 0  # `usedonly` leaves out a counter never incremented
    if state is None or epoch is None:
        return _facts_from_server_info(address, timeout_s, failures, stats_s)
    return AdminFacts(state, epoch, failures, stats_s)


def _facts_from_server_info(
    address: AdminAddress, timeout_s: float, failures: int | None, stats_s: float | None
) -> AdminFacts:
    info = fetch_server_info(address, timeout_s)
    if info is None:
        return AdminFacts(None, None, failures, stats_s)
    return AdminFacts(info.state, info.restart_epoch, failures, stats_s)


@dataclass(frozen=True, slots=True)
class _Round:
    epoch: int
    pid: int
    admin: AdminAddress | None
    final: bool  # one of the window's last rounds: the counter is read whatever it costs


class HealthProber:
    """The real `ports.Health`: rounds of checks on one worker thread, results through a
    pipe the loop watches (`fileno()`)."""

    def __init__(
        self,
        urls: tuple[str, ...],
        admin_of: Callable[[Generation], AdminAddress | None],
        timeout_s: float = 1.0,
    ) -> None:
        self._urls = tuple(urls)
        self._admin_of = admin_of
        self._timeout_s = timeout_s
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._cond = threading.Condition()
        self._pending: _Round | None = None  # handed over, not yet picked up
        self._busy = False  # a round is pending or running
        self._result: HealthObservation | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stats_rest: tuple[int, float] = (0, 0.0)  # the worker's: (pid, until) no /stats

    def fileno(self) -> int:
        return self._read_fd

    def is_busy(self) -> bool:
        """A round is under way; `begin_round` now would be skipped."""
        with self._cond:
            return self._busy

    def begin_round(self, gen: Generation, final: bool = False) -> None:
        """Start a round for `gen` unless one is running (then this one is skipped).
        `final`: one of the health window's last rounds, which reads the listener
        counter even while `/stats` rests (`_ask_admin`)."""
        admin = self._admin_of(gen)  # on the caller's thread: the family is not shared
        with self._cond:
            if self._closed or self._busy:
                return
            self._busy = True
            self._pending = _Round(gen.epoch, gen.pid, admin, final)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, name="envoy-autoreload-health", daemon=True
                )
                with signals_blocked():
                    self._thread.start()
            self._cond.notify()

    def take(self) -> HealthObservation | None:
        """The newest finished observation (once), or None; never blocks."""
        with self._cond:
            if self._closed:
                return None
            self._drain()
            result, self._result = self._result, None
            return result

    def _drain(self) -> None:
        while True:
            try:
                if not os.read(self._read_fd, 4096):
                    return
            except BlockingIOError:
                return

    def close(self) -> None:
        """Stop the worker (waiting at most about one check's timeout for it) and close
        the pipe. A check still stuck past that dies with the daemon thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._pending = None
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(self._timeout_s + _CLOSE_GRACE_S)
        with self._cond:  # the worker writes under this lock, so never to a reused fd
            os.close(self._read_fd)
            os.close(self._write_fd)

    def _next_job(self) -> _Round | None:
        """The round handed over, once there is one; None once closed."""
        with self._cond:
            while self._pending is None and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            job, self._pending = self._pending, None
            return job

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            observation = None
            try:
                observation = self._observe(job)
            finally:  # even if a check raised: a stuck flag would skip every later round
                with self._cond:
                    self._busy = False
            with self._cond:
                if self._closed or observation is None:
                    continue
                self._result = observation
                with contextlib.suppress(BlockingIOError):  # full: the loop is woken anyway
                    os.write(self._write_fd, b"\0")

    def _observe(self, job: _Round) -> HealthObservation | None:
        """One round's checks; None when `close()` came in the middle."""
        state: str | None = None
        admin_epoch: int | None = None
        failures: int | None = None
        if job.admin is not None:
            facts = self._ask_admin(job.pid, job.admin, job.final)
            state, admin_epoch = facts.state, facts.epoch
            failures = facts.listener_create_failures
        results: list[UrlResult] = []
        for url in self._urls:
            if self._stopping():
                return None
            results.append(check_url(url, self._timeout_s))
        return HealthObservation(job.epoch, job.pid, state, admin_epoch, failures, tuple(results))

    def _ask_admin(self, pid: int, admin: AdminAddress, final: bool) -> AdminFacts:
        """The round's admin facts, with `/stats` only as often as its cost allows: with a
        config of tens of thousands of clusters one answer holds the new Envoy's main
        thread (xDS, admin, stats flushes) for 100 ms or more, and asked every 0.5 s for
        the whole window that would be a fifth of it. The rounds between take state and
        epoch from `/server_info` (1.7 ms at any size) and leave the counter unread, so a
        listener failure is seen at the next round with stats. The window's last rounds
        (`final`) always read it: without them one in the window's last stretch (up to
        19 times the answer's time, 2.4 s at 20,000 clusters) would pass probation."""
        rest_pid, rest_until = self._stats_rest
        with_stats = final or pid != rest_pid or time.monotonic() >= rest_until
        facts = fetch_admin_facts(admin, self._timeout_s, with_stats)
        if facts.stats_s is not None:
            self._stats_rest = (pid, time.monotonic() + facts.stats_s * (1 / _STATS_SHARE - 1))
        return facts

    def _stopping(self) -> bool:
        with self._cond:
            return self._closed
