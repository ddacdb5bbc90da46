"""From a settled burst of file changes to a restart request, or a logged reason not to.

A burst is not a request yet: the content may be what already runs (a `touch`, a push
re-run), a watched path may be missing (a push that deletes before it copies: Envoy
would refuse it anyway), or it may be the very content whose restart was given up on.
Only content that is new becomes `FilesChanged`; the supervisor turns it into a request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from envoy_autoreload.digest import Snapshot, WatchRoot
from envoy_autoreload.logs import log_event
from envoy_autoreload.roster import Generation
from envoy_autoreload.watch.changes import SettledBurst
from envoy_autoreload.watch.missing import MissingPaths

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FilesChanged:
    changed: list[str]
    events: int | None


class Triggers:
    def __init__(self, roots: Iterable[WatchRoot]) -> None:
        self.missing = MissingPaths(roots)
        self.abandoned_digest: str | None = None  # content whose restart was given up

    def judge(
        self,
        burst: SettledBurst,
        reference: Snapshot | None,
        last_started: Snapshot | None,
        serving: Generation | None,
        config: Path | None,
    ) -> FilesChanged | None:
        """`reference` is the content the newest live attempt carries (being validated,
        validated and waiting, starting, or serving); a failed attempt is none of these."""
        snapshot = burst.snapshot
        if self.held(snapshot, reference or last_started, serving, config):
            return None
        if runs_already(reference, snapshot, logging.DEBUG, serving):
            return None
        if snapshot.digest == self.abandoned_digest:
            log_event(
                logger,
                logging.INFO,
                "restart.skipped",
                "the content whose restart was given up on; change it or send SIGHUP",
                reason="failed_before",
            )
            return None
        if reference is not None:
            return FilesChanged(snapshot.changed_since(reference), burst.events)
        return FilesChanged(sorted(burst.paths), burst.events)

    def held(
        self,
        snapshot: Snapshot,
        known: Snapshot | None,
        serving: Generation | None,
        config: Path | None,
    ) -> bool:
        """A watched path that existed is gone: no restart until it is back."""
        return self.missing.hold(
            snapshot,
            known,
            config=config,
            epoch=serving.epoch if serving is not None else None,
            pid=serving.pid if serving is not None else None,
        )


def runs_already(
    reference: Snapshot | None, snapshot: Snapshot, level: int, serving: Generation | None
) -> bool:
    """True (and logged) when `reference` is exactly this content."""
    if reference is None or snapshot.digest != reference.digest:
        return False
    log_event(
        logger,
        level,
        "restart.skipped",
        "unchanged, not restarting",
        reason="unchanged",
        epoch=serving.epoch if serving else None,
        pid=serving.pid if serving else None,
    )
    return True
