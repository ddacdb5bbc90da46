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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from envoy_autoreload.debounce import Debouncer
from envoy_autoreload.digest import MAX_HASHED_BYTES, ContentScanner, Snapshot, WatchRoot
from envoy_autoreload.errors import WatchLimitError
from envoy_autoreload.logs import log_event
from envoy_autoreload.watch import Watcher, WatcherKind, open_watcher
from envoy_autoreload.watch.filters import NoiseFilter
from envoy_autoreload.watch.inotify import OVERFLOW

logger = logging.getLogger(__name__)


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
        self._events_at_snapshot = -1
        self._complete = True  # every directory watched: no change can go unseen
        self._excluded: set[str] = set()
        self._warned: set[str] = set()

    @property
    def roots(self) -> tuple[WatchRoot, ...]:
        return self._scanner.roots

    @property
    def watch_count(self) -> int:
        return self._watcher.watch_count if self._watcher is not None else 0

    def plan(self) -> Snapshot:
        """The first snapshot without watching anything: how many watches a run needs.
        The real walk that follows re-reads no file (the stat cache has them)."""
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
        if self._watcher is not None:
            self._rescan()
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
        self._events_at_snapshot = -1  # current() must not reuse a snapshot with them

    def _resolved_exclusions(self) -> frozenset[str]:
        """Each excluded path as given and as resolved: the walk and the watcher name a
        file by the real directory they listed, the user by the path they typed."""
        return frozenset(self._excluded | {os.path.realpath(p) for p in self._excluded})

    def start(self, *, degraded_ok: bool) -> Snapshot:
        """Open the watcher and take the first snapshot, watching as the walk goes.

        Hitting an inotify limit raises `WatchLimitError` (start-up failure) unless
        `degraded_ok`: then whatever could be watched is, and the rest is named.
        """
        try:
            self._watcher = open_watcher(self._watcher_kind, self._noise)
        except WatchLimitError as err:
            if not degraded_ok:
                raise
            log_event(logger, logging.ERROR, "watch.degraded", f"{err}; watching nothing")
            return self.plan()
        snapshot = self._rescan(report=False)
        unwatched, why = self._watcher.take_unwatched()
        if unwatched and not degraded_ok:
            raise WatchLimitError(f"{why} ({len(unwatched)} directories could not be watched)")
        self._report_unwatched(unwatched, why, "watch.degraded")
        return snapshot

    @property
    def active(self) -> bool:
        return self._watcher is not None

    def fileno(self) -> int:
        assert self._watcher is not None
        return self._watcher.fileno()

    def on_readable(self, now: float) -> int:
        """Read what the watcher has; returns how many changed paths it reported."""
        assert self._watcher is not None
        changed = self._watcher.read_changes() - self._scanner.excluded
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
        self._debouncer.add(now, changed)
        return len(changed)

    def deadline(self) -> float | None:
        return self._debouncer.deadline()

    def settle(self, now: float) -> SettledBurst | None:
        if not self._debouncer.is_due(now):
            return None
        events = self._debouncer.events_seen
        self._debouncer.events_seen = 0
        paths = frozenset(self._debouncer.take())
        return SettledBurst(events, paths, self._rescan())

    def current(self) -> Snapshot:
        """The content as it is now. With a watcher and no event since the last scan the
        last snapshot is it: no walk (a rescan of 100,000 files takes ~1 s, on the loop).
        The caller drains pending events first (`on_readable`), so none is missed."""
        if (
            self._watcher is not None
            and self._watcher.drains_synchronously
            and self._complete
            and self.snapshot is not None
            and self.events_total == self._events_at_snapshot
        ):
            return self.snapshot
        return self._rescan()

    def rescan(self) -> Snapshot:
        """The content as it is now, walked afresh (an operator's explicit reload)."""
        return self._rescan()

    def _rescan(self, *, report: bool = True) -> Snapshot:
        if self._excluded:
            self._scanner.excluded = self._resolved_exclusions()
        if self._watcher is None:
            # Degraded without an inotify instance: content is still hashed, so SIGHUP
            # and the control socket still know what serves.
            self.snapshot = self._scanner.scan()
            self._report_limits(self.snapshot)
            return self.snapshot
        self._events_at_snapshot = self.events_total
        snapshot = self._scanner.scan(self._watcher.watch_directory)
        self._watcher.retire(set(snapshot.directories | snapshot.name_watched))
        if report:
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
