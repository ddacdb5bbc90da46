"""Which watched paths changed after an instant, by their inode change time: how a
change made between epoch 0's spawn and the watch on its directory is not lost.

Epoch 0 is spawned before the watched trees are walked (issue 16: with 100,000 files
the walk took ~0.1 s, and Envoy waited for it). Every directory is still watched before
it is listed, so anything changed after the walk reached it raises an event. What
happened in between raises none, but it moved an inode's ctime: a write, a chmod, a new
file (born then), a rename (which sets the moved inode's ctime on ext4, xfs, btrfs and
tmpfs), a symlink replaced by another (a new inode) all do, and a file created in or
removed from a directory moves the directory's. So the first hashing, which stats
every file after its directory was watched, also notes each file, directory and
resolution hop (a `current -> release` link on the way to a root) whose ctime falls
between the spawn and the moment the watch that sees it was added. They are taken as
if an event had named them: UNKNOWN in what epoch 0 started from, and a burst that
restarts it.

A ctime later than that watch is left to the event it raised, which the exclusions and
the noise filter already judged: Envoy creating its `--admin-address-path` file or an
access log in a watched directory once the walk is past it restarts nothing.

What it costs: a spurious restart for something written just before the spawn (within
the margin below), or for a file Envoy itself creates in a watched directory before
the walk reaches it. It never loses a change, as long as file times come from this
machine's clock: on a network filesystem the server stamps them, and a server clock
behind ours by more than the margin can hide a change.

The margins: file times come from the kernel's coarse clock, up to one tick (1-10 ms)
behind the time a process reads, so the spawn's instant is moved back by at least two
ticks. A time in whole seconds is taken to come from a filesystem that keeps no finer
(FAT keeps 2 s, ext3 and ext4 with small inodes 1 s), and gets `WHOLE_SECONDS_S`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

_NS: Final = 1_000_000_000
_CLOCK_REALTIME_COARSE: Final = 5  # <linux/time.h>; Python names no constant for it


def _coarse_tick_s() -> float:
    try:
        return time.clock_getres(_CLOCK_REALTIME_COARSE)
    except OSError:
        return 0.01  # HZ=100, the coarsest tick Linux has


COARSE_CLOCK_S: Final = max(0.01, 2 * _coarse_tick_s())
WHOLE_SECONDS_S: Final = 2.0


@dataclass(slots=True)
class ChangedSince:
    """Real paths whose ctime is at or after `instant_ns` (the wall clock, as file times
    are; less the margin) and not after the watch that would have seen the change.
    `until_ns` bounds what has no watch time of its own (None: nothing was watched, so
    no event will ever come)."""

    instant_ns: int
    until_ns: int | None
    watched_at: dict[str, int] = field(default_factory=dict)  # directory -> wall ns
    paths: set[str] = field(default_factory=set)

    def learn(self, watched_at: Mapping[str, int]) -> None:
        """When each directory's watch was added, from one root's walk; the latest
        counts (it saw less)."""
        for directory, at in watched_at.items():
            self.watched_at[directory] = max(at, self.watched_at.get(directory, at))

    def note(self, path: str, st: os.stat_result) -> None:
        """A file or a hop: its own directory's watch sees a change to it."""
        self._note(path, st, path.rpartition("/")[0] or "/")

    def note_directory(self, path: str) -> None:
        """A directory's ctime moves when an entry is created, removed or renamed in
        it: the only trace a file deleted before the watch leaves. Its own watch sees
        those."""
        try:
            st = os.stat(path)
        except OSError:
            return  # gone: its parent's ctime moved, and the parent is noted
        self._note(path, st, path)

    def note_entry(self, path: str) -> None:
        """A resolution hop, as it is (a symlink replaced is a new inode: a new ctime)."""
        try:
            st = os.lstat(path)
        except OSError:
            return  # gone: the walk found what is there now, and its parent moved
        self.note(path, st)

    def _note(self, path: str, st: os.stat_result, seen_by: str) -> None:
        ctime = st.st_ctime_ns
        watched = self.watched_at.get(seen_by, self.until_ns)
        if watched is not None and ctime > watched:
            return  # after the watch: the event it raised decides
        margin = WHOLE_SECONDS_S if ctime % _NS == 0 else COARSE_CLOCK_S
        if ctime >= self.instant_ns - int(margin * _NS):
            self.paths.add(path)
