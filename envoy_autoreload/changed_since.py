"""Which watched paths changed after an instant, by their inode change time: how a
change made between epoch 0's spawn and the watch on its directory is not lost.

Epoch 0 is spawned before the watched trees are walked (issue 16: with 100,000 files
the walk took ~0.1 s, and Envoy waited for it). Every directory is still watched before
it is listed, so anything changed after the walk reached it raises an event. What
happened in between raises none, but it moved the inode's ctime: a write, a chmod, a
rename (which sets the moved inode's ctime), a new file (born then) all do, and a file
created in or removed from a directory moves the directory's. So the first hashing,
which stats every file after its directory was watched, also notes each file and each
directory whose ctime is not older than the spawn. They are taken as if an event had
named them: UNKNOWN in what epoch 0 started from, and a burst that restarts it.

What that costs: a spurious restart when something was written just before the spawn
(within `COARSE_CLOCK_S`), or when Envoy itself creates a file in a watched directory
for the first time (an access log that did not exist yet). It never loses a change.

The margins: file times come from the kernel's coarse clock, up to one tick (1-10 ms)
behind the time a process reads, so an instant is moved back by `COARSE_CLOCK_S`.
A time in whole seconds is taken to come from a filesystem that keeps no finer (FAT
keeps 2 s, ext3 and some NFS servers 1 s), and gets `WHOLE_SECONDS_S`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Final

COARSE_CLOCK_S: Final = 0.05
WHOLE_SECONDS_S: Final = 2.0
_NS: Final = 1_000_000_000


@dataclass(slots=True)
class ChangedSince:
    """Real paths whose ctime is at or after `instant_ns` (the wall clock, as file times
    are), less the margin their timestamps' granularity needs."""

    instant_ns: int
    paths: set[str] = field(default_factory=set)

    def note(self, path: str, st: os.stat_result) -> None:
        ctime = st.st_ctime_ns
        margin = WHOLE_SECONDS_S if ctime % _NS == 0 else COARSE_CLOCK_S
        if ctime >= self.instant_ns - int(margin * _NS):
            self.paths.add(path)

    def note_directory(self, path: str) -> None:
        """A directory's ctime moves when an entry is created, removed or renamed in
        it: the only trace a file deleted before the watch leaves."""
        try:
            st = os.stat(path)
        except OSError:
            return  # gone: its parent's ctime moved, and the parent is noted
        self.note(path, st)
