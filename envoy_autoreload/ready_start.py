"""A burst's start fired at its deadline, before the steps that decide it (issue 16).

When a burst is due and its verdict is already in (its check ahead passed, or nothing
has to run: validation off and the binary known), what the core is about to decide is
known: epoch N+1 from the staged snapshot. The steps that decide it (settle the burst,
judge it, queue the request, the gate's `begin`, the plan, the start) are about 2 ms of
Python that has not run for seconds, cold in every cache; upstream's restarter forks
from its SIGHUP handler at once. So the start is fired first, into the standby
(`Processes.fire_ahead`), and the same steps then run as they always do; their spawn
takes the child already started instead of starting another.

`ready()` holds only when each of those steps can end one way, for a reason named
below. It is a conjunction: anything unusual (a drain, a retry, a missing path, a
known-bad config, a changed binary, a request already queued, events still unread)
leaves the start to the steps alone. Should the steps still end elsewhere (a defect
here), the child fired is killed at the end of the turn, before it could reach its
parent, and the line says so; the simulation checks that this never happens.
"""

from __future__ import annotations

import logging
from typing import Protocol

from envoy_autoreload.check_ahead import CheckAhead
from envoy_autoreload.digest import Snapshot
from envoy_autoreload.gatekeeper import Gatekeeper
from envoy_autoreload.generations import ConfigGeneration
from envoy_autoreload.logs import log_event
from envoy_autoreload.ports import EnvoyFacts, Processes, Reactor
from envoy_autoreload.roster import Generation, Roster
from envoy_autoreload.settings import Settings
from envoy_autoreload.states import Timer
from envoy_autoreload.triggers import Triggers

logger = logging.getLogger(__name__)


class Hooks(Protocol):
    def current(self) -> Snapshot | None: ...


class ReadyStart:
    def __init__(
        self,
        settings: Settings,
        reactor: Reactor,
        roster: Roster,
        gatekeeper: Gatekeeper,
        check_ahead: CheckAhead,
        triggers: Triggers,
        family: EnvoyFacts,
        processes: Processes,
        hooks: Hooks,
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self._roster = roster
        self._keeper = gatekeeper
        self._check_ahead = check_ahead
        self._triggers = triggers
        self._family = family
        self._processes = processes
        self._hooks = hooks

    def fire(self, stopping: bool) -> None:
        """At the burst's deadline, before it is settled: start it now if `ready`."""
        if stopping:
            return
        ready = self.ready()
        if ready is None:
            return
        serving, config = ready
        epoch = serving.epoch + 1
        # As `Launcher.spawn` would, first: no child of ours is starting (`ready`).
        self._family.restore_flag(serving, epoch)
        self._processes.fire_ahead(epoch, config.path)

    def ready(self) -> tuple[Generation, ConfigGeneration] | None:
        """The serving generation and the staged config, when the steps that follow can
        only start `config` at the next epoch from it."""
        serving = self._roster.serving()
        if serving is None or not self._quiet(serving):
            return None
        flags = self._family.config_flags(serving)
        if self._check_ahead.ready_for(serving, self._reactor.now(), flags) is None:
            return None
        self._hooks.current()  # events still unread are read (and noted) first
        content = self._check_ahead.ready_for(serving, self._reactor.now(), flags)
        if content is None or not self._judged_a_change(content, serving):
            return None
        config = self._keeper.ready_to_start(flags)
        if config is None:
            return None
        return serving, config

    def _quiet(self, serving: Generation) -> bool:
        """What `Supervisor._advance` asks before a start, beyond what `ready_for` asks
        (nothing starting, no plan, no request queued, the gate idle): no drain to wait
        for, no retry's backoff, a parent that can have a child (§4, §6, §8)."""
        roster, reactor = self._roster, self._reactor
        return (
            self._settings.config is not None  # the file judged is the file staged
            and not roster.draining()
            and not roster.socket_taken(serving)
            and not serving.marks.doomed
            and not reactor.has_deadline(Timer.RETRY)
            and not reactor.has_deadline(Timer.DRAIN_WAIT)
        )

    def _judged_a_change(self, content: Snapshot, serving: Generation) -> bool:
        """`Triggers.judge` will make it a request: no watched path is missing (without
        validation nothing else would see a missing file the config names), and it is
        neither what serves nor the content whose retries were given up on (a push of
        the same bytes again is run ahead and passes, yet is skipped)."""
        return (
            serving.snapshot is not None
            and content.digest != serving.snapshot.digest
            and not content.missing
            and content.digest != self._triggers.abandoned_digest
        )

    def settle(self) -> None:
        """End of the turn: a child fired ahead that the steps did not take is killed."""
        pid = self._processes.discard_fired()
        if pid is None:
            return
        log_event(
            logger,
            logging.ERROR,
            "restart.fired_ahead_discarded",
            "a start fired at the burst's deadline was not the start decided; it was "
            "killed before it could reach its parent (please report this)",
            pid=pid,
        )
