"""From filesystem events to "the configuration changed": watcher + debouncer + digest.

The supervisor sees three calls: `on_readable` when the watcher's fd is readable,
`deadline` for when a burst will be due, and `settle` once it is, which rescans and
returns the new snapshot. Whether that snapshot differs from what the serving Envoy
started from is the supervisor's question, because only it knows which generation that is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from envoy_autoreload.debounce import Debouncer
from envoy_autoreload.digest import ContentScanner, Snapshot, WatchRoot
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
        self._watcher_kind = watcher_kind
        self._watcher: Watcher | None = None
        self._debouncer = Debouncer(quiet_s, max_wait_s)
        self.snapshot: Snapshot | None = None
        self.events_total = 0
        self._reported_unreadable: tuple[str, ...] = ()
        self._events_at_snapshot = -1
        self._complete = True  # every directory watched: no change can go unseen

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
        changed = self._watcher.read_changes()
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
        if self._watcher is None:
            # Degraded without an inotify instance: content is still hashed, so SIGHUP
            # and the control socket still know what serves.
            self.snapshot = self._scanner.scan()
            return self.snapshot
        self._events_at_snapshot = self.events_total
        snapshot = self._scanner.scan(self._watcher.watch_directory)
        self._watcher.retire(set(snapshot.directories))
        if report:
            unwatched, why = self._watcher.take_unwatched()
            self._report_unwatched(unwatched, why, "watch.limit_reached")
        self.snapshot = snapshot
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
