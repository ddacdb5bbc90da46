"""Stopping: TERM every child, wait, KILL what is left, and the exit code.

The event-driven form of gunicorn's `arbiter.stop()`: nothing here blocks. SIGTERM goes
to every generation at once, draining ones included: stopping is the one time Envoy's
"never signal a draining parent" rule (ENVOY_FACTS §6) does not apply, since the
successor is being stopped too. Exit codes follow upstream's restarter: 0 when every
child left on TERM, 1 when one had to be KILLed (or the crash budget ran out).
"""

from __future__ import annotations

import logging
import signal
from typing import Final

from envoy_autoreload.errors import ExitCode
from envoy_autoreload.logs import log_event
from envoy_autoreload.ports import EnvoyFacts, Reactor
from envoy_autoreload.roster import Roster
from envoy_autoreload.states import Timer

logger = logging.getLogger(__name__)

KILL_REAP_WAIT_S: Final = 5.0


class Shutdown:
    def __init__(self, reactor: Reactor, roster: Roster, family: EnvoyFacts, term_wait_s: float):
        self._reactor = reactor
        self._roster = roster
        self._family = family
        self._term_wait_s = term_wait_s
        self.stopping = False
        self.exit_code: ExitCode | None = None
        self._floor = ExitCode.CLEAN_STOP

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
        SIGABRT (measured by the conformance scenarios)."""
        alive = self._roster.alive()
        if any(g.marks.terminated for g in alive):
            return  # wait for it; its exit TERMs the next
        for gen in reversed(alive):
            self._roster.mark_terminated(gen)
            gen.process.send_signal(signal.SIGTERM)
            return

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
        """Last resort on the way out of `run()` when start-up itself raised: no child
        outlives the daemon. Never reached from an event handler (they are contained)."""
        for gen in self._roster.alive():
            gen.process.kill()
            gen.process.wait(KILL_REAP_WAIT_S)
            gen.process.close_stderr()
