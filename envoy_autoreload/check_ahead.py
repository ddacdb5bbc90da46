"""The gate's validation started while a burst's debounce still waits (issue 16).

Upstream's restarter forks Envoy from its SIGHUP handler and validates nothing; the
daemon validates every restart with `envoy --mode validate` (~40 ms with the binary,
~60 ms through the PyPI wrapper, ENVOY_FACTS §1), which used to start only once the
burst was due. Here it starts as soon as a burst's events have changed the content:
the config is staged (its snapshot file, no history entry: `Lineage.stage`) and the
gate runs the validation that its `begin` would run for those bytes. When the burst
is due, the gate takes that run if it is exactly the command it would start
(`gate.py`); the verdict is often in by then, so a validated restart starts about as
soon as an unvalidated one.

A run ahead is only ever a verdict about the files as they are at the burst's end:
- every change noted after it started (an event, or one noted without: `suspect`)
  makes it stale, and a stale run is killed at once; the next events start another,
  at most `MAX_PER_BURST` times per burst, so a storm costs a few validations. The
  first starts at once (an editor's save: its verdict is in before the debounce ends);
  a later one only once the files rested `AHEAD_QUIET_S`. Started at once, the runs of
  a storm went stale within milliseconds and the cap was spent before the storm ended:
  its final content was validated only once the burst was due, ~130 ms more to serve
  (`bench/storm.py`, issue 16 goal 3);
- the content handed to `begin` must still have the digest it started on (a change
  a walk found rather than an event, `before_begin`);
- it starts only where events name every change (inotify, no overflow, nothing left
  to hash), and only for a config whose named files were all walked and hashed by
  the names Envoy opens (a `..` after a symlink is resolved), are no `--ignore` or
  editor name (their events are dropped) and are not excluded, and whose outputs
  inside a watched tree are already excluded: a file it names outside the watch
  raises no event (it is watched once a config naming it passed), and an access log
  that `--mode validate` creates would make the run stale by itself. Not with
  `--config-yaml` among the serving Envoy's flags: what that overlay names is not
  looked at;
- it does not start when the content is what serves (a `touch`, identical bytes
  pushed again): that burst restarts nothing.

Nothing here decides what starts: a run not taken only cost CPU, and what `begin`
runs otherwise is exactly what it ran before.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final

from envoy_autoreload.batches import Batches
from envoy_autoreload.bootstrap_facts import BootstrapFacts
from envoy_autoreload.digest import Snapshot
from envoy_autoreload.gatekeeper import Gatekeeper
from envoy_autoreload.planner import Planner
from envoy_autoreload.ports import Content, EnvoyFacts, Reactor
from envoy_autoreload.references import WATCHED_BY_ENVOY, References
from envoy_autoreload.roster import Generation, Roster
from envoy_autoreload.states import Timer
from envoy_autoreload.watching import Watching

MAX_PER_BURST: Final = 3  # an editor's save is two or three reads of events
AHEAD_QUIET_S: Final = 0.05  # rest before a second run ahead (or third) of one burst


class CheckAhead:
    def __init__(
        self,
        gatekeeper: Gatekeeper,
        watching: Watching | None,
        roster: Roster,
        planner: Planner,
        batches: Batches,
        family: EnvoyFacts,
        reactor: Reactor,
    ) -> None:
        self._keeper = gatekeeper
        self._reactor = reactor
        self._changes = watching.changes if watching is not None else None
        self._roster = roster
        self._planner = planner
        self._batches = batches
        self._family = family
        self._tried_at = self._changes_seen()  # changes noted at the last attempt
        # (changes noted, serving PID, content digest) when the run ahead started.
        self._started_for: tuple[int, int, str] | None = None
        self._launches = 0  # in the burst under way
        self._refused: str | None = None  # a content digest not run ahead: not tried again
        self._seen = self._tried_at  # changes noted at the last event
        self._changed_at = 0.0  # when they were noticed

    def after_event(self, stopping: bool) -> None:
        """After each event and what it led to: drop a run that is stale, and start one
        on the files as they are now when they changed since the last attempt."""
        serving = self._roster.serving()
        wanted = not stopping and serving is not None and self._may_run(serving)
        if not self._burst_pending():
            self._launches = 0
        seen = self._changes_seen()
        if seen != self._seen:
            self._seen, self._changed_at = seen, self._reactor.now()
        gate = self._keeper.gate
        if gate.ahead and (not wanted or not self._still_current(serving)):
            gate.drop_ahead()
        fresh = seen != self._tried_at
        if wanted and fresh and serving is not None and not gate.ahead and self._rested():
            self._start(serving)

    def _rested(self) -> bool:
        """The burst's first run starts at once; a later one once the files rested
        `AHEAD_QUIET_S` (the module's notes). Until then `Timer.CHECK_AHEAD` brings
        the loop back, and this is asked again."""
        if self._launches == 0:
            return True
        at = self._changed_at + AHEAD_QUIET_S
        if self._reactor.now() >= at:
            return True
        self._reactor.set_deadline(Timer.CHECK_AHEAD, at)
        return False

    def before_begin(self, content: Snapshot | None) -> None:
        """Right before the gate's `begin` for `content`: a run ahead that is not about
        exactly that content is killed (`begin` would then run its own). The burst is
        judged now: the next one gets its own runs ahead."""
        self._launches = 0
        started = self._started_for
        if (
            not self._still_current(self._roster.serving())
            or content is None
            or started is None
            or content.digest != started[2]
        ):
            self._keeper.gate.drop_ahead()

    def ready_for(self, serving: Generation, now: float, flags: Sequence[str]) -> Snapshot | None:
        """The content of the burst due `now`, when it is the one staged (and run ahead):
        nothing noted since, the same serving PID, every change applied (`applied`: no
        hashing here, a burst of 10,000 files is applied a slice a turn), the same
        digest; never with `--config-yaml`, whose overlay nobody looked at."""
        changes, started = self._changes, self._started_for
        if changes is None or started is None or "--config-yaml" in flags:
            return None
        due, applied = changes.deadline(), changes.applied
        ready = (
            self._may_run(serving)
            and self._still_current(serving)
            and applied is not None
            and applied.digest == started[2]
            and due is not None
            and due <= now
        )
        return applied if ready else None

    def _start(self, serving: Generation) -> None:
        changes = self._changes
        content = changes.applied if changes is not None else None
        if content is None:
            return  # files left to hash, or only a walk would tell: a later turn
        self._tried_at = self._changes_seen()
        if serving.snapshot is None or content.digest == serving.snapshot.digest:
            return  # this content serves already: the burst restarts nothing
        if self._launches >= MAX_PER_BURST or content.digest == self._refused:
            return
        flags = self._family.config_flags(serving)
        if "--config-yaml" in flags:
            return
        self._launches += 1

        def safe(facts: BootstrapFacts) -> bool:
            changes = self._changes
            return changes is not None and named_files_seen(changes, content, facts.references)

        started = self._keeper.check_ahead(flags, safe)
        if started or self._keeper.staged_for_start:
            # Run ahead, or (nothing to validate) only staged: either way ready for its
            # burst while nothing changes (`ready_for`, `ready_start.py`).
            self._started_for = (self._tried_at, serving.pid, content.digest)
        if not started:
            self._refused = content.digest  # not again for these files (the binary among them)

    def _still_current(self, serving: Generation | None) -> bool:
        started = self._started_for
        return (
            serving is not None
            and started is not None
            and started[:2] == (self._changes_seen(), serving.pid)
        )

    def _may_run(self, serving: Generation) -> bool:
        """Only where the burst's own check would come next: files are watched and
        read, a burst is pending, and nothing else holds the gate or the next start."""
        changes = self._changes
        return (
            changes is not None
            and not changes.building
            and self._burst_pending()
            and serving.marks.stop_reason is None
            and self._roster.starting() is None
            and self._planner.plan is None
            and not self._batches.queued
            and not self._keeper.gate.busy
        )

    def _burst_pending(self) -> bool:
        return self._changes is not None and self._changes.deadline() is not None

    def _changes_seen(self) -> int:
        changes: Content | None = self._changes
        return changes.events_total if changes is not None else 0


def named_files_seen(changes: Content, content: Snapshot, references: References | None) -> bool:
    """Whether a change to any file the config names is an event: each one was walked
    and hashed under the name Envoy opens (it is in `content`), no event naming it is
    dropped (noise, excluded), and it has no other name a writer could use (a hard
    link: inotify tells only the directory written through). Each file it makes Envoy
    write inside a watched tree is excluded already, so that `--mode validate` creating
    it is no change. None that Envoy watches itself (SDS `watched_directory`, path-based
    xDS): their events are dropped, yet validation may read them."""
    if references is None or any(why == WATCHED_BY_ENVOY for _, why in references.excluded):
        return False  # unreadable: Envoy's validation says why, at the burst's end
    roots = [root.path for root in changes.roots]

    def under_a_root(path: Path) -> bool:
        return any(path.is_relative_to(root) for root in roots)

    def seen(path: Path) -> bool:
        return (
            str(path) in content.files
            and under_a_root(path)
            and not changes.is_noise(path)
            and not changes.is_excluded(path)
            and changes.has_one_name(path)
        )

    return all(map(seen, references.reads)) and all(
        changes.is_excluded(path) or not under_a_root(path) for path, _ in references.excluded
    )
