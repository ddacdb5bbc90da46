"""The `watchdog` backend: for macOS and other non-Linux dev loops, and tested on Linux.

watchdog's observer runs its own thread. That thread does one thing: put the raw paths
of an event on a queue and write a byte to a pipe whose read end sits in the daemon's
selector. Filtering, new-directory watches and everything else happen in the main
thread, in `read_changes`, like the inotify backend. Each directory is scheduled on its
own (not recursively), from the same scanner walk the inotify backend uses, so both
backends watch exactly the same set.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
from pathlib import Path

from watchdog.events import (
    DirModifiedEvent,
    FileClosedNoWriteEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

from envoy_autoreload.limits import watch_limit_message
from envoy_autoreload.signal_mask import signals_blocked
from envoy_autoreload.watch import directories_under
from envoy_autoreload.watch.filters import NoiseFilter

_IGNORED_EVENTS = (FileOpenedEvent, FileClosedNoWriteEvent, DirModifiedEvent)


class _QueueingHandler(FileSystemEventHandler):
    """Runs in watchdog's thread: queue the paths, ring the pipe, touch nothing else."""

    def __init__(self, sink: queue.SimpleQueue[tuple[str, bool]], bell_fd: int) -> None:
        self._sink = sink
        self._bell_fd = bell_fd

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, _IGNORED_EVENTS):
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if raw:
                path = raw.decode(errors="surrogateescape") if isinstance(raw, bytes) else raw
                self._sink.put((path, event.is_directory))
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._bell_fd, b"\0")


class WatchdogWatcher:
    drains_synchronously = False  # events arrive through watchdog's thread

    def __init__(self, noise: NoiseFilter) -> None:
        self._noise = noise
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._queue: queue.SimpleQueue[tuple[str, bool]] = queue.SimpleQueue()
        self._handler = _QueueingHandler(self._queue, self._write_fd)
        self._observer: BaseObserver = Observer()
        self._observer.daemon = True
        with signals_blocked():
            self._observer.start()
        self._watches: dict[Path, tuple[ObservedWatch, frozenset[str] | None, int]] = {}
        self._unwatched: list[Path] = []
        self._limit_message = ""
        self._unwatchable: list[tuple[Path, str]] = []

    def take_unwatched(self) -> tuple[list[Path], str]:
        unwatched, self._unwatched = self._unwatched, []
        return unwatched, self._limit_message

    def take_unwatchable(self) -> list[tuple[Path, str]]:
        unwatchable, self._unwatchable = self._unwatchable, []
        return unwatchable

    def fileno(self) -> int:
        return self._read_fd

    @property
    def watch_count(self) -> int:
        return len(self._watches)

    def watch_directory(self, path: Path, names: frozenset[str] | None) -> None:
        try:
            inode = os.stat(path).st_ino
        except OSError:
            return
        existing = self._watches.get(path)
        if existing is not None:
            watch, current, watched_inode = existing
            if watched_inode == inode:
                merged = None if current is None or names is None else current | names
                self._watches[path] = (watch, merged, inode)
                return
            # Replaced by a rename: the old emitter follows the old inode away.
            del self._watches[path]
            with contextlib.suppress(KeyError, OSError):
                self._observer.unschedule(watch)
        try:
            with signals_blocked():  # it may start an emitter thread
                watch = self._observer.schedule(self._handler, str(path), recursive=False)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EMFILE):
                self._unwatched.append(path)
                self._limit_message = watch_limit_message(path, self.watch_count)
            elif err.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES):
                self._unwatchable.append((path, err.strerror or str(err)))
            return  # otherwise gone or unreadable since the walk saw it
        self._watches[path] = (watch, names, inode)

    def retire(self, keep: set[Path]) -> None:
        for path, (watch, _names, _inode) in list(self._watches.items()):
            if path in keep:
                continue
            del self._watches[path]
            with contextlib.suppress(KeyError, OSError):
                self._observer.unschedule(watch)

    def read_changes(self, *, drain: bool = True) -> set[str]:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read_fd, 4096):
                pass
        changed: set[str] = set()
        while True:
            try:
                raw, is_directory = self._queue.get_nowait()
            except queue.Empty:
                return changed
            path = Path(raw)
            if self._noise.is_noise(path.name):
                continue
            entry = self._watches.get(path.parent)
            if entry is not None and entry[1] is not None and path.name not in entry[1]:
                continue
            if is_directory and entry is not None and entry[1] is None and path.is_dir():
                self._watch_new_tree(path)
            changed.add(str(path))

    def _watch_new_tree(self, top: Path) -> None:
        for directory in directories_under(top, self._noise):
            self.watch_directory(directory, None)

    def close(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
        os.close(self._read_fd)
        os.close(self._write_fd)
