"""From filesystem events to "the configuration changed": watcher + debouncer + digest.

The supervisor sees three calls: `on_readable` when the watcher's fd is readable,
`deadline` for when a burst will be due, and `settle` once it is, which rescans and
returns the new snapshot. Whether that snapshot differs from what the serving Envoy
started from is the supervisor's question, because only it knows which generation that is.

Files Envoy itself writes (access logs named in its config) can be excluded: they are
neither hashed nor counted as events, or each `envoy --mode validate` reopening them
and each request appended would restart Envoy, forever (review #15).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from envoy_autoreload.changed_since import ChangedSince, DirNames, Identity, path_identity
from envoy_autoreload.content import RootScan
from envoy_autoreload.debounce import Debouncer
from envoy_autoreload.digest import (
    MAX_HASHED_BYTES,
    ContentScanner,
    Listing,
    Snapshot,
    WatchRoot,
    hash_listing,
)
from envoy_autoreload.errors import WatchLimitError
from envoy_autoreload.incremental import Incremental, mark_unknown
from envoy_autoreload.limits import Usage, check_limits, inotify_usage
from envoy_autoreload.logs import log_event
from envoy_autoreload.watch import Watcher, WatcherKind, open_watcher
from envoy_autoreload.watch.build import BackgroundHash
from envoy_autoreload.watch.filters import NoiseFilter
from envoy_autoreload.watch.inotify import OVERFLOW
from envoy_autoreload.watch.pending import PendingPaths

logger = logging.getLogger(__name__)

# Named paths are applied in slices of loop time (a file read and hashed each, 20-100 us).
APPLY_SLICE_S: Final = 0.01


@dataclass(frozen=True, slots=True)
class Listed:
    """What the walk found before any file was read: for `watch.started`."""

    directories: int = 0
    files: int = 0
    missing: tuple[str, ...] = ()

    @classmethod
    def of(cls, listings: list[Listing]) -> Listed:
        files = sum(len(batch.names) for listing in listings for batch in listing.batches)
        missing = tuple(path for listing in listings for path in listing.missing)
        return cls(sum(len(listing.directories) for listing in listings), files, missing)


@dataclass(frozen=True, slots=True)
class _Walked:
    """The watcher opened and every root listed, or why no watcher could be opened."""

    watcher: Watcher | None
    listings: list[Listing]
    error: WatchLimitError | None = None


@dataclass(frozen=True, slots=True)
class SettledBurst:
    events: int
    paths: frozenset[str]
    snapshot: Snapshot


class ChangeDetector:
    def __init__(
        self,
        roots: Iterable[WatchRoot],
        *,
        watcher_kind: WatcherKind,
        ignore_globs: Iterable[str],
        quiet_s: float,
        max_wait_s: float,
    ) -> None:
        self._noise = NoiseFilter(ignore_globs)
        self._scanner = ContentScanner(roots, self._noise)
        self._given_roots = self._scanner.roots  # --watch, --config, the binary
        self._watcher_kind = watcher_kind
        self._watcher: Watcher | None = None
        self._debouncer = Debouncer(quiet_s, max_wait_s)
        self.snapshot: Snapshot | None = None
        self.events_total = 0
        self._reported_unreadable: tuple[str, ...] = ()
        self._complete = True  # every directory watched: no change can go unseen
        self._stale = False  # exclusions or roots changed: the next look walks afresh
        self._excluded: set[str] = set()
        self._warned: set[str] = set()
        self._unapplied = PendingPaths()  # paths events named since the last apply
        self._build: BackgroundHash | None = None
        self._touched: set[str] = set()  # paths events named while the build ran
        self.listed = Listed()
        self._identities: dict[WatchRoot, Identity | None] = {}  # at the spawn
        self._listings: Mapping[str, DirNames] = {}  # at the spawn, too

    @property
    def roots(self) -> tuple[WatchRoot, ...]:
        return self._scanner.roots

    @property
    def watch_count(self) -> int:
        return self._watcher.watch_count if self._watcher is not None else 0

    @property
    def building(self) -> bool:
        """The first hashing still runs: no snapshot to compare with yet."""
        return self._build is not None

    def start_building(self) -> None:
        """Start the first hashing `start(background=True)` prepared (after the spawn)."""
        if self._build is not None:
            self._build.start()

    def build_fileno(self) -> int | None:
        return self._build.fileno() if self._build is not None else None

    def plan(self) -> Snapshot:
        """A snapshot without watching anything (`--check`: how many watches a run needs)."""
        self.snapshot = self._scanner.scan()
        return self.snapshot

    def watch_referenced(self, paths: Iterable[Path]) -> bool:
        """Watch these files too (the ones the config makes Envoy read: `references.py`),
        in place of the ones given before; True when the set changed. Watches follow at
        the next walk, which happens now once watching runs."""
        given = [root.path for root in self._given_roots]
        extra = tuple(
            WatchRoot(p) for p in sorted(set(paths)) if not any(p.is_relative_to(g) for g in given)
        )
        roots = (*self._given_roots, *extra)
        if roots == self._scanner.roots:
            return False
        self._scanner.roots = roots
        if self._watcher is not None and self._build is None:
            self._rescan()
        else:
            self._stale = True
        return True

    def exclude_paths(self, paths: Iterable[Path]) -> None:
        """Leave these exact files out of the digest and out of event counts from now on.

        For files Envoy writes inside a watched tree (`envoy_outputs.paths_envoy_writes`).
        Adds to what was excluded before and never takes a path back: a draining epoch
        still writes the old config's log. Relative paths are taken from our working
        directory; symlinks in the path are resolved at each scan, so a log directory
        created later is matched too. The next `current()`, `rescan()` or settle walks
        afresh; a snapshot taken before excludes nothing, so exclude before `start()`
        where possible, or compare the serving content again after the call.
        """
        added = {os.path.abspath(path) for path in paths} - self._excluded
        if not added:
            return
        self._excluded |= added
        self._scanner.excluded = self._resolved_exclusions()
        self._stale = True  # current() must not reuse a snapshot with them

    def _resolved_exclusions(self) -> frozenset[str]:
        """Each excluded path as given and as resolved: the walk and the watcher name a
        file by the real directory they listed, the user by the path they typed."""
        return frozenset(self._excluded | {os.path.realpath(p) for p in self._excluded})

    def root_paths(self) -> list[Path]:
        return [root.path for root in self._scanner.roots]

    def remember_roots(
        self, identities: Mapping[Path, Identity | None], listings: Mapping[str, DirNames]
    ) -> None:
        """What each root resolved to, and the directories Envoy writes a file in held,
        just before epoch 0's spawn, which comes before the walk, for `start` to compare
        (`changed_since.mark_spawn`)."""
        self._identities = {root: identities.get(root.path) for root in self._scanner.roots}
        self._listings = listings

    def _swapped_roots(self) -> set[str]:
        """Roots that resolve to another file or directory than at the spawn: swapped
        before the walk watched them (`mv app.new app` above `--watch app/conf` moves
        only the ctime of `app`, which every entry made in it moves too)."""
        identities, self._identities = self._identities, {}
        return {str(r.path) for r, before in identities.items() if path_identity(r.path) != before}

    def _open_and_walk(self, changed: ChangedSince | None = None) -> _Walked:
        try:
            watcher = open_watcher(self._watcher_kind, self._noise)
        except WatchLimitError as err:
            return _Walked(None, [], err)
        listings = self._scanner.list_roots(watcher.watch_directory, changed=changed)
        return _Walked(watcher, listings)

    def start(
        self,
        *,
        degraded_ok: bool,
        background: bool = False,
        changed_since_ns: int | None = None,
    ) -> Snapshot | None:
        """Open the watcher and walk every root, watching each directory before listing
        it; then hash what was listed, now or (`background`) on a worker thread, in
        which case the snapshot comes from `take_built()` and this returns None. With
        `changed_since_ns` (the wall clock at epoch 0's spawn, which came before this
        walk), what changed since then is taken as changed (`changed_since.py`).

        Hitting an inotify limit raises `WatchLimitError` (start-up failure) unless
        `degraded_ok`: then whatever could be watched is, and the rest is named.
        """
        since = self._changed_since(changed_since_ns)
        walked = self._open_and_walk(since if background else None)
        if walked.watcher is None:
            assert walked.error is not None
            if not degraded_ok:
                raise walked.error
            log_event(logger, logging.ERROR, "watch.degraded", f"{walked.error}; watching nothing")
            return self._unwatched_reference(changed_since_ns)
        self._watcher, listings = walked.watcher, walked.listings
        self._stale = False  # walked with the exclusions and roots given so far
        unwatched, why = self._watcher.take_unwatched()
        self._check_limits(self.watch_count + len(unwatched))
        if unwatched and not degraded_ok:
            raise WatchLimitError(f"{why} ({len(unwatched)} directories could not be watched)")
        self._report_unwatched(unwatched, why, "watch.degraded")
        self._report_unwatchable(self._watcher.take_unwatchable())
        self.listed = Listed.of(listings)
        caches = [self._scanner.cached(listing.root) for listing in listings]
        if background:
            self._build = BackgroundHash(listings, caches, since)
            swapped = self._swapped_roots()
            if swapped:
                self._take(time.monotonic(), swapped)  # touched: UNKNOWN, and a burst
            return None
        return self._keep([hash_listing(lst, c) for lst, c in zip(listings, caches, strict=True)])

    def _changed_since(self, instant_ns: int | None) -> ChangedSince | None:
        if instant_ns is None:
            return None
        return ChangedSince(instant_ns, listings=self._listings, excluded=self._scanner.excluded)

    def _unwatched_reference(self, changed_since_ns: int | None) -> Snapshot:
        """Nothing is watched: the files are read now, and what changed since epoch 0's
        spawn (`changed_since_ns`) is UNKNOWN in what this returns, the reference, so a
        SIGHUP or a `reload` restarts for it; `snapshot` holds the files as they are."""
        if changed_since_ns is None:
            return self.plan()
        since = self._changed_since(changed_since_ns)
        assert since is not None
        scans = self._scanner.scan_roots(changed=since)
        for scan in scans:
            since.note_scanned(scan.directories, scan.name_watches)
        since.paths |= self._swapped_roots()
        self.snapshot = self._scanner.keep(scans)
        return Snapshot.of(tuple(mark_unknown(scans, since.paths)))

    def take_built(self) -> Snapshot | None:
        """Once the background hashing is done: the reference, what an Envoy started
        during it may have read (every path an event named meanwhile is UNKNOWN in
        it), while `snapshot` holds the content as it is now. None until then."""
        build = self._build
        if build is None or not build.done():
            return None
        self.on_readable(time.monotonic())  # what the kernel holds happened meanwhile too
        self._build = None
        scans = build.result()
        unseen = build.changed.paths if build.changed is not None else set()
        touched, self._touched = self._touched | unseen, set()
        reference = Snapshot.of(tuple(mark_unknown(scans, touched)))
        self._keep(scans)
        if unseen:
            self._report_unseen(unseen)
            self._take(time.monotonic(), unseen)  # a burst, as if events had named them
        log_event(
            logger,
            logging.DEBUG,
            "watch.digested",
            files=reference.file_count,
            took_s=round(build.took_s, 3),
            touched=len(touched),
        )
        if self._stale:
            self._rescan()
        return reference

    @property
    def active(self) -> bool:
        return self._watcher is not None

    def fileno(self) -> int:
        assert self._watcher is not None
        return self._watcher.fileno()

    def on_readable(self, now: float, *, drain: bool = True) -> int:
        """Read what the watcher has (with `drain` False, one slice of it: the fd stays
        readable); returns how many changed paths it reported."""
        assert self._watcher is not None
        changed = self._watcher.read_changes(drain=drain) - self._scanner.excluded
        if not changed:
            return 0
        for path in sorted(changed)[:20]:
            log_event(logger, logging.DEBUG, "watch.event", path=path)
        if OVERFLOW in changed:
            log_event(
                logger,
                logging.WARNING,
                "watch.overflow",
                "the kernel dropped filesystem events; rescanning everything",
            )
        self.events_total += len(changed)
        self._take(now, changed)
        return len(changed)

    def suspect(self, path: Path) -> None:
        """A change that may have raised no event (made before its directory was
        watched): handled as if one had named `path`."""
        self.events_total += 1
        self._take(time.monotonic(), {str(path)})

    def _take(self, now: float, changed: set[str]) -> None:
        self._unapplied.add(changed)
        if self._build is not None:
            self._touched |= changed
        self._debouncer.add(now, changed)
        self._apply_some()

    def deadline(self) -> float | None:
        """When `settle` wants to run: the burst's due time, or at once while named
        paths wait to be applied a slice at a time."""
        if self._build is not None:
            return None
        due = self._debouncer.deadline()
        if due is not None and self._unapplied and self._incremental():
            return 0.0
        return due

    def settle(self, now: float) -> SettledBurst | None:
        if self._build is not None:
            return None
        if self._unapplied and not self._apply_some():
            return None  # more next turn: signals and exits are not kept waiting
        if not self._debouncer.is_due(now):
            return None
        events = self._debouncer.events_seen
        self._debouncer.events_seen = 0
        paths = frozenset(self._debouncer.take())
        return SettledBurst(events, paths, self._refresh())

    def current(self) -> Snapshot:
        """The content as it is now: the last snapshot with what events named since
        applied (the caller drains pending events first, so none is missed). A walk
        only where events cannot be trusted to name every change."""
        assert self._build is None, "no content before the first hashing is done"
        return self._refresh()

    @property
    def applied(self) -> Snapshot | None:
        """The content now, from the events read so far, when that needs no walk and no
        file is left to hash (`current()` without its cost); None otherwise."""
        return self.snapshot if self._incremental() and not self._unapplied else None

    def is_excluded(self, path: Path) -> bool:
        """Whether `exclude_paths` was given this file (as given or resolved)."""
        return os.path.abspath(path) in self._scanner.excluded

    def has_one_name(self, path: Path) -> bool:
        """No hard link elsewhere: inotify tells only the directory written through."""
        try:
            return os.stat(path).st_nlink == 1
        except OSError:
            return False

    def is_noise(self, path: Path) -> bool:
        """Whether events naming this file are dropped (an editor's or `--ignore` name),
        even where it is hashed (a file given as a root itself)."""
        return self._noise.is_noise(path.name)

    def rescan(self) -> Snapshot:
        """The content as it is now, walked afresh (an operator's explicit reload)."""
        return self._rescan()

    def _incremental(self) -> bool:
        """Whether events name every change, so applying them is the content now."""
        watcher = self._watcher
        return (
            watcher is not None
            and watcher.drains_synchronously
            and self._complete
            and not self._stale
            and self.snapshot is not None
            and self._build is None
            and OVERFLOW not in self._unapplied
        )

    def _refresh(self) -> Snapshot:
        if not self._incremental():
            return self._rescan()
        assert self.snapshot is not None
        if not self._unapplied:
            return self.snapshot
        return self._apply(self._unapplied.take_all())

    def _apply_some(self) -> bool:
        """Apply named paths for at most `APPLY_SLICE_S` of loop time, parents first;
        True when none is left (or the settle walks instead). A 10,000-file burst is
        read while it is written, in slices, not in one stall after the quiet window
        (issue 16). The time is checked at every path (`PendingPaths.pop_until`), and
        the snapshot is made once per slice: its cost grows with the tree."""
        if not self._incremental():
            return True  # the settle walks instead
        if self._unapplied:
            self._apply(self._unapplied.pop_until(time.monotonic() + APPLY_SLICE_S))
        return not self._unapplied

    def _apply(self, paths: Iterable[str]) -> Snapshot:
        """Apply these paths (parents first), consumed one at a time."""
        assert self._watcher is not None
        patched, rescan = Incremental(self._scanner, self._watcher.watch_directory).apply(paths)
        self._scanner.remember(patched)  # one snapshot per slice: `_keep` makes it
        if rescan:
            roots = [self._scanner.roots[i] for i in sorted(rescan)]
            return self._keep(self._scan_roots(roots))
        return self._keep([])

    def _scan_roots(self, roots: list[WatchRoot] | None = None) -> list[RootScan]:
        assert self._watcher is not None
        listings = self._scanner.list_roots(self._watcher.watch_directory, roots)
        return [hash_listing(lst, self._scanner.cached(lst.root)) for lst in listings]

    def _rescan(self) -> Snapshot:
        if self._excluded:
            self._scanner.excluded = self._resolved_exclusions()
        self._unapplied.clear()
        self._stale = False
        if self._watcher is None:
            # Degraded without an inotify instance: content is still hashed, so SIGHUP
            # and the control socket still know what serves.
            self.snapshot = self._scanner.scan()
            self._report_limits(self.snapshot)
            return self.snapshot
        return self._keep(self._scan_roots())

    def _keep(self, scans: list[RootScan]) -> Snapshot:
        """Make these scans current; retire watches nothing needs any more."""
        snapshot = self._scanner.keep(scans)
        assert self._watcher is not None
        self._watcher.retire(set(snapshot.directories | snapshot.name_watched))
        unwatched, why = self._watcher.take_unwatched()
        self._report_unwatched(unwatched, why, "watch.limit_reached")
        self._report_unwatchable(self._watcher.take_unwatchable())
        self.snapshot = snapshot
        self._report_limits(snapshot)
        if snapshot.unreadable and snapshot.unreadable != self._reported_unreadable:
            self._reported_unreadable = snapshot.unreadable
            log_event(
                logger,
                logging.WARNING,
                "watch.unreadable",
                "permission denied; changes there are not seen",
                paths=list(snapshot.unreadable[:10]),
                count=len(snapshot.unreadable),
            )
        return snapshot

    def _report_unseen(self, unseen: set[str]) -> None:
        log_event(
            logger,
            logging.INFO,
            "watch.changed_at_start",
            "changed between Envoy's start and the watch that sees them; taken as changed",
            paths=sorted(unseen)[:10],
            count=len(unseen),
        )

    def _check_limits(self, need: int) -> None:
        """Warn when this run's watches leave less than 10% of a limit free: counted by
        the one walk that also added them (issue 16: no walk just to count), so the
        watches held already are ours, not another process's."""
        held = self.watch_count
        usage = inotify_usage()
        others = Usage(max(usage.instances - 1, 0), max(usage.watches - held, 0))
        for check in check_limits(need, others):
            if not check.ok:
                log_event(logger, logging.WARNING, "watch.limit_low", check.advice())

    def _report_unwatchable(self, failures: list[tuple[Path, str]]) -> None:
        """Directories the kernel would not watch for a reason other than the limits
        (ENAMETOOLONG, ELOOP, ENOMEM...): changes there go unseen, so `current()` walks
        again each time instead of trusting "no event"; said once per directory."""
        if not failures:
            return
        self._complete = False
        fresh = [f"{path} ({why})" for path, why in failures if str(path) not in self._warned]
        self._warned.update(str(path) for path, _why in failures)
        if fresh:
            log_event(
                logger,
                logging.WARNING,
                "watch.unwatchable",
                "cannot watch these directories; changes there are seen only at the next "
                "rescan (SIGHUP still restarts)",
                paths=fresh[:10],
                count=len(fresh),
            )

    def _report_limits(self, snapshot: Snapshot) -> None:
        """Warn once per path about what `digest`'s bounds left out (review #12)."""
        big = [p for p in snapshot.by_stat if p not in self._warned]
        cut = [p for p in snapshot.not_walked if p not in self._warned]
        self._warned.update(big, cut)
        if big:
            log_event(
                logger,
                logging.WARNING,
                "watch.not_hashed",
                f"larger than {MAX_HASHED_BYTES // (1024 * 1024)} MiB: compared by size and "
                "modification time, not content",
                paths=big[:10],
                count=len(big),
            )
        if cut:
            log_event(
                logger,
                logging.WARNING,
                "watch.not_walked",
                "symlinked directories not followed (or not to the end); changes there "
                "are not seen",
                paths=cut[:10],
                count=len(cut),
            )

    def _report_unwatched(self, unwatched: list[Path], why: str, event: str) -> None:
        if not unwatched:
            return
        self._complete = False
        log_event(
            logger,
            logging.ERROR,
            event,
            f"{why}; changes under these directories are not seen until the limit is raised "
            "(SIGHUP still restarts)",
            paths=[str(p) for p in unwatched[:5]],
            count=len(unwatched),
        )

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
