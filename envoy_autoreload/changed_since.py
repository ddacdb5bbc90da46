"""Which watched paths changed after an instant, by their inode change time: how a
change made between epoch 0's spawn and the watch on its directory is not lost.

Epoch 0 is spawned before the watched trees are walked (issue 16: with 100,000 files
the walk took ~0.1 s, and Envoy waited for it). Every directory is still watched before
it is listed, so anything changed after the walk reached it raises an event. What
happened in between raises none, but it moved an inode's ctime: a write, a chmod, a new
file (born then), a rename (which sets the moved inode's ctime on ext4, xfs, btrfs and
tmpfs), a symlink replaced by another (a new inode) all do, and a file created in or
removed from a directory moves the directory's. So:

- the walk stats each directory right after adding its watch, and `lstat`s each
  resolution hop (a `current -> release` link on the way to a root) right after its
  name watch: a ctime after the spawn there is a change nothing will report;
- what each root resolves to (device and inode) is taken just before the spawn and
  compared after the walk (`watching.py`): a directory above a root swapped in between
  leaves no other trace; Taken at
  that moment, not later: a directory keeps only its last change's time, and a file
  Envoy creates there afterwards (an access log, its `--admin-address-path` file,
  excluded from the digest) would hide a deletion made before the watch;
- the first hashing, which stats every file after its directory was watched, notes
  each file whose ctime is after the spawn (a later change also raised an event: it is
  counted twice, which is the same restart; a file Envoy keeps appending to, such as
  a `--log-path` inside a watched tree, is one restart too many, as its every close
  already was).

Noted paths are taken as if an event had named them: UNKNOWN in what epoch 0 started
from, and a burst that restarts it.

What it costs: a spurious restart for something written just before the spawn (within
the margin below), or for a file Envoy itself creates in a watched directory before
the walk reaches it. Those its command line names (`--admin-address-path`, which each
epoch 0 writes as it starts) are the exception: their directories are listed with the
mark, and one whose entries are the same after the walk, less Envoy's own files, is
no change (a file changed in place there moved its own ctime; an access log the config
names was created by the validation, before the mark). It never loses a change, as
long as file times come from this machine's clock: on a network filesystem the server
stamps them, and a server clock behind ours by more than the margin can hide a change.

The margins: file times come from the kernel's coarse clock, up to one tick (1-10 ms)
behind the time a process reads, so the spawn's instant is moved back by at least two
ticks. A time in whole seconds is taken to come from a filesystem that keeps no finer
(FAT keeps 2 s, ext3 and ext4 with small inodes 1 s), and gets `WHOLE_SECONDS_S`.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
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

Identity = tuple[int, int]


def path_identity(path: Path) -> Identity | None:
    """(device, inode) of what `path` resolves to; None when it does not (yet)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


DirNames = frozenset[str]


@dataclass(frozen=True, slots=True)
class SpawnMark:
    """Taken just before epoch 0's spawn, in this order: what each root resolved to,
    the entries of each directory Envoy's command line makes it write a file in
    (`--admin-address-path`: creating it moves the directory's ctime, and Envoy starts
    before the walk, the more so when it is spawned before the daemon has loaded,
    `head_start.py`), then the wall clock. The mark travels to the watcher."""

    roots: Mapping[Path, Identity | None]
    wall_ns: int
    listings: Mapping[str, DirNames] = field(default_factory=dict)


def mark_spawn(roots: Iterable[Path], written: Iterable[Path] = ()) -> SpawnMark:
    identities = {root: path_identity(root) for root in roots}
    listings = {}
    for directory in {os.path.realpath(path.parent) for path in written}:
        with contextlib.suppress(OSError):
            listings[directory] = frozenset(os.listdir(directory))
    return SpawnMark(identities, time.time_ns(), listings)


@dataclass(slots=True)
class ChangedSince:
    """Real paths whose ctime is at or after `instant_ns` (the wall clock, as file times
    are), less the margin their timestamps' granularity needs. A directory listed at
    the spawn (`SpawnMark.listings`) whose entries are the same now, but for `excluded`
    ones (files Envoy writes), is not: Envoy creating one of them moved its ctime, and
    a file changed in place there moved its own."""

    instant_ns: int
    paths: set[str] = field(default_factory=set)
    listings: Mapping[str, DirNames] = field(default_factory=dict)
    excluded: frozenset[str] = frozenset()

    def note(self, path: str, st: os.stat_result) -> None:
        if self._after(st):
            self.paths.add(path)

    def _after(self, st: os.stat_result) -> bool:
        ctime = st.st_ctime_ns
        margin = WHOLE_SECONDS_S if ctime % _NS == 0 else COARSE_CLOCK_S
        return ctime >= self.instant_ns - int(margin * _NS)

    def note_watched(self, path: str, *, follow: bool) -> None:
        """A directory (`follow`) or a hop (as it is, `lstat`), right after its watch."""
        try:
            st = os.stat(path) if follow else os.lstat(path)
        except OSError:
            return  # gone: what resolves now was walked, and the root reads as missing
        if not self._after(st):
            return
        if stat.S_ISDIR(st.st_mode) and self._only_envoy_wrote(path):
            return  # a root's own directory is a hop too, and gets here unfollowed
        self.paths.add(path)

    def _only_envoy_wrote(self, directory: str) -> bool:
        real = os.path.realpath(directory)
        before = self.listings.get(real)
        if before is None:
            return False
        try:
            now = os.listdir(real)
        except OSError:
            return False
        return self._kept(real, now) == self._kept(real, before)

    def _kept(self, directory: str, names: Iterable[str]) -> set[str]:
        return {name for name in names if os.path.join(directory, name) not in self.excluded}

    def note_hop(self, directory: Path, name: str) -> None:
        """A resolution hop right after its name watch, as it is: a link replaced is a
        new inode. (A directory above a root renamed into place, `mv app.new app` above
        `--watch app/conf`, moves only that directory's ctime, which every entry made
        in it moves too: `Watching` compares the roots' identities instead.)"""
        self.note_watched(str(directory / name), follow=False)

    def note_scanned(self, directories: Iterable[Path], hops: Mapping[Path, Iterable[str]]) -> None:
        """Every directory and hop again, after the files were read: without a watch
        (no inotify instance) a file deleted between the listing and its reading left
        no other trace."""
        for directory in directories:
            self.note_watched(str(directory), follow=True)
        for directory, names in hops.items():
            for name in names:
                self.note_hop(directory, name)
