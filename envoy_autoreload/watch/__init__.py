"""Filesystem watching: the `Watcher` protocol and the choice of backend.

Linux uses inotify directly (one instance, its fd in the selector: no thread, no
polling). Elsewhere, or with `--watcher watchdog`, the watchdog observer feeds the same
loop through a pipe. Both are told which directories to watch by the content scanner
and both report changed paths; the debouncer and the digest do the rest.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, Protocol

from envoy_autoreload.watch.filters import NoiseFilter

WatcherKind = Literal["auto", "inotify", "watchdog"]


class Watcher(Protocol):
    # True when an event is readable as soon as the change returns (inotify's kernel
    # queue); a thread-fed backend may lag, so "no event yet" proves nothing there.
    drains_synchronously: bool

    def fileno(self) -> int: ...

    @property
    def watch_count(self) -> int: ...

    def watch_directory(self, path: Path, names: frozenset[str] | None) -> None: ...

    def retire(self, keep: set[Path]) -> None: ...

    def read_changes(self, *, drain: bool = True) -> set[str]: ...

    def take_unwatched(self) -> tuple[list[Path], str]: ...

    def take_unwatchable(self) -> list[tuple[Path, str]]: ...

    def close(self) -> None: ...


def directories_under(top: Path, noise: NoiseFilter) -> Iterator[Path]:
    """`top` and every directory below it, parents first, symlinks not followed.

    For a tree that appears in one piece (`mkdir -p`, `mv staged conf/`): each is
    watched as soon as it is found, before its entries are listed. An explicit stack,
    not `os.walk`, which recurses on Python 3.11 and would raise RecursionError on a
    tree ~1000 levels deep, inside the loop (review #13). Unreadable or vanished
    directories are skipped: the settle's rescan reports them.
    """
    stack = [top]
    while stack:
        directory = stack.pop()
        yield directory
        try:
            with os.scandir(directory) as entries:
                names = sorted(
                    entry.name
                    for entry in entries
                    if entry.is_dir(follow_symlinks=False) and not noise.is_noise(entry.name)
                )
        except OSError:
            continue
        stack.extend(directory / name for name in reversed(names))


def open_watcher(kind: WatcherKind, noise: NoiseFilter) -> Watcher:
    """inotify on Linux unless watchdog is asked for; watchdog everywhere else."""
    if kind == "inotify" or (kind == "auto" and sys.platform.startswith("linux")):
        from envoy_autoreload.watch.inotify import InotifyWatcher

        return InotifyWatcher(noise)
    from envoy_autoreload.watch.fallback import WatchdogWatcher

    return WatchdogWatcher(noise)
