"""Stopping: TERM every child, newest first, wait, KILL what is left, and the exit code.

The event-driven form of gunicorn's `arbiter.stop()`: nothing here blocks. Every
generation is TERMed, draining ones included: stopping is the one time Envoy's "never
signal a draining parent" rule (ENVOY_FACTS §6) does not apply, since the successor is
being stopped too. Exit codes follow upstream's restarter: 0 when every child left on
TERM, 1 when one had to be KILLed (or the crash budget ran out).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from envoy_autoreload.batches import Batches
from envoy_autoreload.control import ControlServer
from envoy_autoreload.errors import ExitCode
from envoy_autoreload.logs import log_event
from envoy_autoreload.ports import EnvoyFacts, Gate, Reactor
from envoy_autoreload.roster import Roster
from envoy_autoreload.states import Timer
from envoy_autoreload.telemetry import Telemetry

logger = logging.getLogger(__name__)

KILL_REAP_WAIT_S: Final = 5.0
# A TERMed Envoy tells its parent to exit on its way out, and the parent does ~20 ms
# later (ENVOY_FACTS §6). A SIGTERM that reaches the parent meanwhile finds its signal
# handlers gone and kills it (rc -15, seen in CI), so it gets this long to go by itself.
PARENT_LEAVING_GRACE_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class Stopping:
    """What else stops with the children: the gate's command, systemd's status, the
    waiting clients, new control connections."""

    gate: Gate
    telemetry: Telemetry
    batches: Batches
    control: ControlServer | None


class Shutdown:
    def __init__(
        self,
        reactor: Reactor,
        roster: Roster,
        family: EnvoyFacts,
        term_wait_s: float,
        stopping: Stopping,
    ):
        self._reactor = reactor
        self._roster = roster
        self._family = family
        self._term_wait_s = term_wait_s
        self._others = stopping
        self.stopping = False
        self.exit_code: ExitCode | None = None
        self._floor = ExitCode.CLEAN_STOP
        self._asked_to_leave: int | None = None  # the PID a TERMed child asks to exit
        self._in_grace: int | None = None  # that PID, given time to exit by itself

    def stop(self, reason: str, floor: ExitCode, status_text: Callable[[], str]) -> None:
        """Stop everything: no more timers or checks, clients answered, children TERMed."""
        if not self.begin(reason, floor):
            return
        for timer in Timer:
            self._reactor.cancel(timer)
        others = self._others
        others.gate.abandon()
        others.telemetry.stopping(f"stopping: {reason}")
        others.batches.finish(
            "stopping",
            reason,
            seq=others.batches.request_seq,
            status=status_text(),
            message=f"the daemon is stopping ({reason})",
        )
        if others.control is not None:
            self._reactor.remove_reader(others.control.fileno())
        self.signal_all(reason)

    def begin(self, reason: str, floor: ExitCode) -> bool:
        """Enter stopping; False (and logged) when already stopping."""
        if self.stopping:
            log_event(logger, logging.INFO, "shutdown.already_stopping", reason)
            return False
        self.stopping = True
        self._floor = max(self._floor, floor)
        return True

    def signal_all(self, reason: str) -> None:
        alive = self._roster.alive()
        for gen in alive:
            # Its base id, for the segment left behind (ENVOY_FACTS §0), while it runs:
            # a SIGTERM soon after the spawn comes before any probe looked.
            self._family.observe(gen)
        log_event(
            logger,
            logging.INFO,
            "shutdown.started",
            reason,
            epochs=[g.epoch for g in alive],
            pids=[g.pid for g in alive],
            term_wait_s=self._term_wait_s,
        )
        self._term_newest()
        if alive:
            self._reactor.set_timeout(Timer.TERM_WAIT, self._term_wait_s)
        self.finish_if_done()

    def _term_newest(self) -> None:
        """TERM the newest generation not yet asked, once every one asked has gone.

        Newest first, one at a time: a TERMed Envoy asks its parent to exit on its way
        out (ENVOY_FACTS §6), so the family goes down in order. TERMing all at once
        races: a child whose parent already exited retries for 10 s and dies by
        SIGABRT (measured by the conformance scenarios). The parent so asked is left
        PARENT_LEAVING_GRACE_S to go by itself before it is TERMed."""
        alive = self._roster.alive()
        if not alive or any(g.marks.terminated for g in alive):
            return  # wait for it; its exit TERMs the next
        gen = alive[-1]
        if self._in_grace is not None and self._in_grace != gen.pid:
            self._in_grace = None  # it left within its grace
            self._reactor.cancel(Timer.PARENT_LEAVING)
        if gen.pid == self._in_grace:
            return  # Timer.PARENT_LEAVING TERMs it
        if gen.pid == self._asked_to_leave:
            self._asked_to_leave = None
            self._in_grace = gen.pid
            self._reactor.set_timeout(Timer.PARENT_LEAVING, PARENT_LEAVING_GRACE_S)
            return
        parent = alive[-2] if len(alive) > 1 else None
        if gen.epoch > 0 and parent is not None and parent.epoch == gen.epoch - 1:
            self._asked_to_leave = parent.pid
        self._roster.mark_terminated(gen)
        gen.process.send_signal(signal.SIGTERM)

    def parent_grace_over(self) -> None:
        """The parent its child asked to exit is still here: TERM it."""
        self._in_grace = None
        self.finish_if_done()

    def kill_remaining(self) -> None:
        """--term-wait is over: SIGKILL whoever is left; exit 1 (upstream's contract)."""
        alive = self._roster.alive()
        for gen in alive:
            log_event(
                logger,
                logging.WARNING,
                "shutdown.killing",
                f"still alive {self._term_wait_s:g} s after SIGTERM; sending SIGKILL",
                epoch=gen.epoch,
                pid=gen.pid,
                config=gen.config_short,
            )
            gen.process.kill()
        if alive:
            self._floor = ExitCode.CHILD_KILLED
            self._reactor.set_timeout(Timer.KILL_WAIT, KILL_REAP_WAIT_S)

    def kill_timed_out(self) -> None:
        log_event(
            logger,
            logging.ERROR,
            "shutdown.kill_timeout",
            "children did not go away after SIGKILL",
            pids=[g.pid for g in self._roster.alive()],
        )
        self.exit_code = ExitCode.CHILD_KILLED

    def finish_if_done(self) -> None:
        if self.stopping and self._roster.alive():
            self._term_newest()
        if self.stopping and not self._roster.alive():
            self._reactor.cancel(Timer.TERM_WAIT)
            self._reactor.cancel(Timer.KILL_WAIT)
            self.exit_code = self._floor
            self._family.remove_shared_memory()
            log_event(logger, logging.INFO, "shutdown.finished", exit_code=int(self.exit_code))

    def kill_leftovers(self) -> None:
        """Last resort on the way out of `run()` with children still running: start-up
        raised (the walk after epoch 0's spawn hit an inotify limit: issue 16), or a
        shutdown's SIGKILL wait ran out. No child outlives the daemon. SIGTERM first:
        at start-up nothing drains yet, and Envoy exits at once (ENVOY_FACTS §2);
        SIGKILL after `KILL_REAP_WAIT_S` to what is left of the group, a helper ignoring
        SIGTERM too (the leader is reaped last, so the group's id is still its own).
        Never reached from an event handler (they are contained)."""
        alive = [gen for gen in self._roster.alive() if gen.process.returncode is None]
        if not alive:
            return
        log_event(
            logger,
            logging.WARNING,
            "shutdown.leftovers",
            "the daemon is exiting and Envoy still runs (a start-up that failed after "
            "epoch 0 was started); stopping it",
            epochs=[gen.epoch for gen in alive],
            pids=[gen.pid for gen in alive],
        )
        for gen in alive:
            self._family.observe(gen)  # its base id, when Envoy runs already
            gen.process.kill(signal.SIGTERM)  # the group: an Envoy under a shell too
        for gen in alive:
            gen.process.finish_group(KILL_REAP_WAIT_S)  # SIGKILL for what ignored TERM
            gen.process.close_stderr()
        if all(gen.process.returncode is not None for gen in alive):
            self._family.remove_shared_memory()
