"""Watched paths that existed and are gone: a config deleted, a directory removed by a
push that deletes before it copies. Envoy would refuse the config anyway, so no change
restarts it until they are back; a warning says so once (`watch.missing`), and an info
line when they return (`watch.restored`). Paths missing since start-up hold nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from envoy_autoreload.digest import Snapshot, WatchRoot
from envoy_autoreload.logs import log_event

logger = logging.getLogger(__name__)


def _reachable(path: Path) -> bool:
    """Whether `path` can be stat'ed. Any error counts as missing: an unsearchable
    directory (EACCES), a name over NAME_MAX, a loop. `Path.exists()` raises for all
    but ENOENT/ENOTDIR/EBADF/ELOOP on Python 3.11, inside the loop (review #13); and a
    config we cannot reach is one Envoy, running as us, could not read either."""
    try:
        os.stat(path)
    except (OSError, ValueError):  # ValueError: an embedded NUL byte
        return False
    return True


class MissingPaths:
    """Decides, for each settled snapshot, whether a vanished path holds the restart."""

    def __init__(self, roots: Iterable[WatchRoot]) -> None:
        self._tops = [os.path.abspath(root.path) for root in roots]
        self.reported: tuple[str, ...] = ()

    def is_watched(self, path: Path) -> bool:
        """Whether `path` lies in a watched directory tree (or is a watched file)."""
        target = os.path.abspath(path)
        return any(
            target == top or target.startswith(top.rstrip(os.sep) + os.sep) for top in self._tops
        )

    def hold(
        self,
        snapshot: Snapshot,
        known: Snapshot | None,
        *,
        config: Path | None = None,
        epoch: int | None = None,
        pid: int | None = None,
    ) -> bool:
        """True while a path that `known` (what serves, or last started) had is gone.

        `config` is the file the serving Envoy runs when it is no watch root of its own
        (no --config): checked directly, if it lies in a watched tree; elsewhere its
        return would raise no event to end the hold.
        """
        gone = [p for p in snapshot.missing if known is None or p not in known.missing]
        if (
            config is not None
            and self.is_watched(config)
            and not _reachable(config)
            and str(config) not in gone
        ):
            gone.append(str(config))
        back = [p for p in self.reported if p not in gone and p not in snapshot.missing]
        if back:
            log_event(logger, logging.INFO, "watch.restored", "is back", paths=back)
        if gone and tuple(gone) != self.reported:
            log_event(
                logger,
                logging.WARNING,
                "watch.missing",
                f"{', '.join(gone)} {'is' if len(gone) == 1 else 'are'} missing: no restart "
                "until it is back"
                + (f"; epoch {epoch} keeps serving" if epoch is not None else ""),
                epoch=epoch,
                pid=pid,
                paths=gone,
            )
        self.reported = tuple(gone)
        return bool(gone)
