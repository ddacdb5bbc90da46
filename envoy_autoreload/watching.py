"""The supervisor's side of the watched files: start watching, read events into the
debounce, and hand out the content as it is now.

What a settled burst *means* is `triggers.py`'s question; this module only drives the
`Content` port (real: `watch.changes.ChangeDetector`) in the loop's time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from envoy_autoreload import heap
from envoy_autoreload.bootstrap_facts import BootstrapFacts
from envoy_autoreload.changed_since import SpawnMark, mark_spawn
from envoy_autoreload.digest import Snapshot
from envoy_autoreload.logs import log_event
from envoy_autoreload.ports import Content, Reactor
from envoy_autoreload.references import References
from envoy_autoreload.roster import Roster
from envoy_autoreload.settings import Settings
from envoy_autoreload.states import Timer
from envoy_autoreload.telemetry import Telemetry
from envoy_autoreload.traps import command_line_outputs
from envoy_autoreload.watch.changes import SettledBurst

logger = logging.getLogger(__name__)


class Watching:
    def __init__(
        self,
        settings: Settings,
        reactor: Reactor,
        changes: Content,
        telemetry: Telemetry,
        roster: Roster,
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self.changes = changes
        self._telemetry = telemetry
        self._roster = roster
        self._referenced_said = False
        self._spawned_ns: int | None = None  # epoch 0 was spawned before the walk

    def before_first_spawn(self, mark: SpawnMark | None = None) -> None:
        """Epoch 0 starts before anything is watched (issue 16: Envoy does not wait for a
        100,000-file walk): what it starts from comes once the files are read, and what
        changed since `mark` (taken now unless the spawn came earlier, `head_start.py`)
        must count (`changed_since.py`)."""
        changes = self.changes
        if mark is None:
            mark = mark_spawn(
                changes.root_paths(), command_line_outputs(self._settings.start_script)
            )
        self._spawned_ns = mark.wall_ns
        self._roster.reference_pending = True
        changes.remember_roots(mark.roots, mark.listings)

    def start(
        self,
        *,
        background: bool = False,
        pin: str | None = None,
        facts: BootstrapFacts | None = None,
    ) -> None:
        """Walk and watch every root; hash the files now, or (`background`, the first
        start) on a worker thread once epoch 0 runs: Envoy does not wait for a big tree
        to be read (issue 16, watch/build.py). `pin`: the sha256 of --config as the
        start-up check snapshotted it, which predates the watch on its directory.
        `facts`: of the config epoch 0 runs (`Gate.facts_before_loop`)."""
        changes = self.changes
        # Before the first snapshot, or it holds the log.
        self.exclude_envoy_outputs(facts)
        changes.exclude_paths(command_line_outputs(self._settings.start_script))
        snapshot = changes.start(
            degraded_ok=self._settings.watch_degraded,
            background=background,
            changed_since_ns=self._spawned_ns,
        )
        self._spawned_ns = None
        if snapshot is not None and self._roster.reference_pending:
            self._roster.attach_reference(snapshot)  # read at once: watching nothing
        if snapshot is not None:
            heap.settle()  # the files are read: what stays, stays (heap.py)
        self._suspect_a_change_since(pin)
        if changes.active:
            self._reactor.add_reader(changes.fileno(), changes)
        build = changes.build_fileno()
        if build is not None:
            self._roster.reference_pending = True
            self._reactor.add_reader(build, changes)
        listed = changes.listed
        log_event(
            logger,
            logging.INFO,
            "watch.started",
            roots=[str(r.path) for r in changes.roots],
            directories=len(snapshot.directories) if snapshot else listed.directories,
            files=snapshot.file_count if snapshot else listed.files,
            watches=changes.watch_count,
        )
        for missing in snapshot.missing if snapshot else listed.missing:
            log_event(
                logger,
                logging.WARNING,
                "watch.missing",
                "does not exist yet; watching for it to appear",
                path=missing,
            )

    def _suspect_a_change_since(self, pin: str | None) -> None:
        """The config was snapshotted for the start-up check before anything was
        watched (the walk comes after epoch 0's spawn: issue 16), so a save in between
        raised no event, and may be older than the spawn (`changed_since.py` misses it).
        If the file no longer holds the pinned bytes, it is taken as changed, as if an
        event had named it: the restart request follows the first reading of the files.
        """
        config = self._settings.config
        if pin is None or config is None or not self.changes.active:
            return
        try:
            now = hashlib.sha256(config.read_bytes()).hexdigest()
        except OSError:
            now = None  # gone or unreadable: a change too
        if now != pin:
            self.changes.suspect(Path(os.path.realpath(config)))

    def exclude_envoy_outputs(self, facts: BootstrapFacts | None) -> None:
        """Follow the config that will run (its snapshot, when there is one): files
        Envoy writes (access logs) inside a watched tree are no config: each `envoy
        --mode validate` reopens them and every request grows them, so leaving them in
        the digest is a restart loop (REVIEW-core finding 15); exclusions only grow, as
        a draining epoch still writes the old config's log. Files it makes Envoy read at
        start (certificates, Lua) are watched like `--watch` paths (`references.py`).

        `facts` are what the gate read as it began validating the config, never parsed
        here (`bootstrap_facts.py`: a big one in a child, as a 5 MB config takes seconds
        to parse, issue 16). Relative paths in them are Envoy's, taken as from our
        working directory: its own is unknown before it runs (`config.relative_paths`
        says when they differ)."""
        # Unreadable or no mapping: Envoy's own validation says what is wrong with it.
        references = facts.references if facts is not None else None
        if references is None:
            return
        # What Envoy writes or reloads itself is no change to restart for, even inside
        # a watched tree (path-based xDS: Envoy picks a change up without a restart).
        self.changes.exclude_paths(p for p, _why in references.excluded)
        if self._settings.watch_referenced:
            self._follow_references(references)

    def _follow_references(self, references: References) -> None:
        changed = self.changes.watch_referenced(references.reads)
        if not changed and (self._referenced_said or not references.excluded):
            return
        self._referenced_said = True
        log_event(
            logger,
            logging.INFO,
            "watch.referenced",
            "files the config names are watched too; a change restarts Envoy",
            files=sorted(str(p) for p in references.reads),
            excluded=[f"{path}: {why}" for path, why in references.excluded],
        )

    def on_readable(self, *, drain: bool = False) -> None:
        """The watcher's fd is readable: one slice of its events per turn of the loop,
        unless everything pending must be known now (`drain`, for `current()`)."""
        changes = self.changes
        self._telemetry.watch_events.inc(changes.on_readable(self._reactor.now(), drain=drain))
        if changes.building:
            self._take_built()
        deadline = changes.deadline()
        if deadline is not None:
            self._reactor.set_deadline(Timer.DEBOUNCE, deadline)

    def _take_built(self) -> None:
        """The first hashing is done: generations started meanwhile get the reference,
        and the requests held for it go ahead."""
        build = self.changes.build_fileno()
        reference = self.changes.take_built()
        if reference is None:
            return
        if build is not None:
            self._reactor.remove_reader(build)
        self._roster.attach_reference(reference)
        self._reactor.set_timeout(Timer.ADVANCE, 0)
        heap.settle()  # the first hashing is done: what stays, stays (heap.py)

    @property
    def building(self) -> bool:
        return self.changes.building

    def current(self) -> Snapshot | None:
        """What is on disk now; events already in the kernel's queue are read first (and
        start their debounce), so "nothing happened since the last scan" is true. None
        while the first hashing runs, or before it (epoch 0's spawn came first): nothing
        to compare with yet."""
        if self._spawned_ns is not None:
            return None
        if self.changes.active:
            self.on_readable(drain=True)
        return None if self.changes.building else self.changes.current()

    def settle(self) -> SettledBurst | None:
        """The burst once it is due; until then the debounce deadline is re-armed."""
        burst = self.changes.settle(self._reactor.now())
        if burst is None:
            deadline = self.changes.deadline()
            if deadline is not None:
                self._reactor.set_deadline(Timer.DEBOUNCE, deadline)
        return burst
