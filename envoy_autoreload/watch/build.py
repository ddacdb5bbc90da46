"""Hashing the watched files on a worker thread while Envoy starts (issue 16).

Reading 100,000 files takes seconds; epoch 0 used to wait for it. Now Envoy is spawned
first, then the walk (watch and list every directory, ~0.1 s for 100,000 files) runs,
and the hashing after it, here. Why that order loses no change: every directory is
watched before it is listed, so anything changed after the walk reached it raises an
event; the paths events name while the hashing runs are *touched*. What changed
between the spawn and the watch raised no event but moved its ctime: the walk notes
directories and links as it watches them, and the hashing notes files
(`changed_since.py`). The reference (what the first epoch started from) holds
`UNKNOWN` for both, which equals no content. The first comparison after the build then
reports each as changed: a spurious restart at worst (a `touch` during start-up), never
a lost change.

The thread reads files and builds its own objects; it touches no state of the loop's.
It rings a pipe whose read end the loop watches (the health prober's pattern), and is
joined by the loop once the pipe is readable. It is started with the daemon's signals
blocked, so only the main thread ever takes one (signal_mask.signals_blocked).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

from envoy_autoreload.changed_since import ChangedSince
from envoy_autoreload.content import RootScan
from envoy_autoreload.digest import Listing, hash_listing
from envoy_autoreload.signal_mask import signals_blocked


class BackgroundHash:
    """`hash_listing` for every listing, on a thread; `fileno()` readable when done."""

    def __init__(
        self,
        listings: list[Listing],
        caches: list[RootScan | None],
        changed: ChangedSince | None = None,
    ) -> None:
        self._listings = listings
        self._caches = caches
        self.changed = changed  # filled by the thread: read it once `done()`
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self.started_at = time.monotonic()
        self.took_s = 0.0
        self._scans: list[RootScan] = []
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="content-hash", daemon=True)

    def start(self) -> None:
        """Once Envoy is spawned: before, the thread would take turns with the spawn's
        path for the interpreter, and the CPU from Envoy's first start (issue 16)."""
        if self._thread.ident is None:
            self.started_at = time.monotonic()
            with signals_blocked():
                self._thread.start()

    def fileno(self) -> int:
        return self._read_fd

    def _run(self) -> None:
        try:
            pairs = zip(self._listings, self._caches, strict=True)
            changed = self.changed
            self._scans = [hash_listing(listing, cache, changed) for listing, cache in pairs]
        except Exception as err:  # noqa: BLE001 (handed to the loop, which contains it)
            self._error = err
        finally:
            self.took_s = time.monotonic() - self.started_at
            os.write(self._write_fd, b"!")

    def done(self) -> bool:
        try:
            return bool(os.read(self._read_fd, 1))
        except BlockingIOError:
            return False

    def result(self) -> list[RootScan]:
        """The scans, once `done()`; re-raises what the thread raised."""
        self.start()
        self._thread.join()
        self.close()
        if self._error is not None:
            raise self._error
        return self._scans

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
