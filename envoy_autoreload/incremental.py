"""Applying what inotify named to the last scan, instead of walking every root again.

A settled burst used to rescan the whole watched tree: with 100,000 files a one-file
change cost ~0.7 s more than in a 10-file tree, and each `current()` after an event a
second of loop time (issue 16). inotify names the directory and the entry that changed
(inotify(7)), so where that name is all there is to know, the entry alone is read:

- a directory is *plain* when the walk reached it without a symlink and it is not one
  of kubelet's `..<timestamp>` directories: its path is its display path, and an event
  in it changes exactly the entry it names (a file read again, a new subdirectory
  walked, a removed one dropped with everything below it);
- anything else (a symlink on the way, `..data` swapped, a name watch on a chain's
  parent, the root itself replaced) rescans the root it belongs to, with the last scan
  as the stat cache: a ConfigMap mount or a `--config` file is a handful of files;
- a path no root claims, or a queue overflow, rescans everything (the caller's part).

An event means something happened to the entry, so a named file is always read again:
its stat may look unchanged (a same-size rewrite within one timestamp tick).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import immutables

from envoy_autoreload.content import UNKNOWN, DirMap, RootScan, content_of, contribution
from envoy_autoreload.digest import (
    ContentScanner,
    DirectoryCallback,
    FileHashing,
    Listing,
    WalkDirectory,
    hash_listing,
)


@dataclass
class _Patch:
    """One root's scan being updated in place of a rescan."""

    scan: RootScan
    excluded: frozenset[str]
    tree: immutables.Map[str, DirMap] = field(init=False)
    total: int = field(init=False)
    count: int = field(init=False)
    directories: set[Path] = field(init=False)
    plain: immutables.Map[Path, str] = field(init=False)
    unreadable: list[str] = field(init=False)
    by_stat: list[str] = field(init=False)

    def __post_init__(self) -> None:
        scan = self.scan
        self.tree = scan.tree
        self.total, self.count = scan.total, scan.count
        self.directories = set(scan.directories)
        self.plain = scan.plain
        self.unreadable = list(scan.unreadable)
        self.by_stat = list(scan.by_stat)

    def set_file(self, display_dir: str, name: str, entry: bytes | None) -> None:
        """Put (or with None, drop) one file's entry, keeping the digest sum."""
        display = f"{display_dir}/{name}"
        names = self.tree.get(display_dir)
        old = names.get(name) if names is not None else None
        if old is not None:
            self.total -= contribution(display, content_of(old))
            self.count -= 1
            names = names.delete(name) if names is not None else None
        if entry is not None:
            names = (names if names is not None else immutables.Map()).set(name, entry)
            self.total += contribution(display, content_of(entry))
            self.count += 1
        if names is None:
            return
        if len(names):
            self.tree = self.tree.set(display_dir, names)
        elif display_dir in self.tree:
            self.tree = self.tree.delete(display_dir)

    def drop_tree(self, real: Path, display: str) -> None:
        """Forget a directory and everything below it (deleted or moved away)."""
        prefix = display + "/"
        for directory in [d for d in self.tree if d == display or d.startswith(prefix)]:
            for name, entry in self.tree[directory].items():
                self.total -= contribution(f"{directory}/{name}", content_of(entry))
                self.count -= 1
            self.tree = self.tree.delete(directory)
        for path in [p for p in self.plain if p == real or p.is_relative_to(real)]:
            self.plain = self.plain.delete(path)
        self.directories = {d for d in self.directories if not d.is_relative_to(real)}

    def merge(self, sub: RootScan) -> None:
        """Add a subtree walked on its own (a directory that appeared)."""
        self.tree = self.tree.update(sub.tree)
        self.total += sub.total
        self.count += sub.count
        self.directories |= sub.directories
        self.plain = self.plain.update(sub.plain)
        self.unreadable += sub.unreadable
        self.by_stat += sub.by_stat

    def forget_reports(self, display: str) -> None:
        """A file read again is no longer unreadable or too big until it says so."""
        self.unreadable = [u for u in self.unreadable if not u.startswith(display + " (")]
        self.by_stat = [b for b in self.by_stat if b != display]

    def finish(self) -> RootScan:
        return replace(
            self.scan,
            tree=self.tree,
            total=self.total,
            count=self.count,
            directories=frozenset(self.directories),
            plain=self.plain,
            unreadable=tuple(self.unreadable),
            by_stat=tuple(self.by_stat),
            files_read=0,
        )


class Incremental:
    """Applies named paths to a scanner's scans; says which roots need a rescan."""

    def __init__(self, scanner: ContentScanner, on_directory: DirectoryCallback) -> None:
        self._scanner = scanner
        self._on_directory = on_directory
        self._patches: dict[int, _Patch] = {}

    def apply(self, paths: Iterable[str]) -> tuple[list[RootScan], set[int]]:
        """Patched scans, and the indexes of the roots to rescan instead."""
        rescan: set[int] = set()
        for raw in sorted(paths):  # parents before their children
            path = Path(raw)
            claimed = False
            for index in range(len(self._scanner.roots)):
                outcome = self._apply_to_root(index, path)
                claimed = claimed or outcome is not None
                if outcome is False:
                    rescan.add(index)
            if not claimed:
                rescan.update(range(len(self._scanner.roots)))
        patched = [p.finish() for i, p in self._patches.items() if i not in rescan]
        return patched, rescan

    def _apply_to_root(self, index: int, path: Path) -> bool | None:
        """True: applied; False: the root must be rescanned; None: not this root's."""
        patch = self._patches.get(index)
        scan = patch.scan if patch is not None else self._scanner.cached(self._scanner.roots[index])
        if scan is None:
            return False
        plain = patch.plain if patch is not None else scan.plain
        directories = patch.directories if patch is not None else scan.directories
        display_dir = plain.get(path.parent)
        if display_dir is not None and not path.name.startswith(".."):
            if self._scanner.noise.is_noise(path.name):
                return True
            return self._update(index, scan, display_dir, path)
        watched = scan.name_watches.keys()
        if path.parent in directories or path in directories or path == scan.root.path:
            return False
        return False if path.parent in watched or path in watched else None

    def _update(self, index: int, scan: RootScan, display_dir: str, path: Path) -> bool:
        patch = self._patches.get(index)
        if patch is None:
            patch = self._patches[index] = _Patch(scan, self._scanner.excluded)
        display = f"{display_dir}/{path.name}"
        try:
            st = os.lstat(path)
        except OSError:
            st = None  # gone (or unreadable: the rescan of a settle reports it)
        if st is not None and stat.S_ISLNK(st.st_mode):
            return False  # where it leads is the walk's business
        patch.set_file(display_dir, path.name, None)
        patch.forget_reports(display)
        if path in patch.plain or st is None or stat.S_ISDIR(st.st_mode):
            patch.drop_tree(path, display)
        if st is None:
            return True
        if stat.S_ISDIR(st.st_mode):
            return self._walk_new(patch, WalkDirectory(display, path, st, False, None))
        if stat.S_ISREG(st.st_mode) and not {display, str(path)} & patch.excluded:
            hashing = FileHashing(None, time.time_ns(), patch.excluded)
            patch.set_file(display_dir, path.name, hashing.entry_for(display, str(path), True))
            patch.unreadable += hashing.unreadable
            patch.by_stat += hashing.by_stat
        return True

    def _walk_new(self, patch: _Patch, top: WalkDirectory) -> bool:
        listing = Listing(patch.scan.root, self._on_directory, self._scanner.excluded)
        self._scanner.walk_tree(top, listing)
        if listing.name_watches or listing.not_walked:
            return False  # symlinks inside: the root's walk follows them
        patch.merge(hash_listing(listing, None))
        return True


# An entry equal to no file's: a stat nobody has and content no file hashes to.
_UNKNOWN_ENTRY = bytes(41) + UNKNOWN


def mark_unknown(scans: list[RootScan], touched: set[str]) -> list[RootScan]:
    """These scans with every touched path's content UNKNOWN: the reference for an
    Envoy that started while they were read (watch/build.py). A path in a plain
    directory is marked alone; one elsewhere in a root marks the root (a `<root>/`
    entry), and one no root claims (an overflow) marks them all."""
    if not touched:
        return scans
    patches = [_Patch(scan, frozenset()) for scan in scans]
    for raw in sorted(touched):
        path = Path(raw)
        claimed = [p for p in patches if _mark_one(p, path)]
        if not claimed:
            for patch in patches:
                patch.set_file(str(patch.scan.root.path), "", _UNKNOWN_ENTRY)
    return [patch.finish() for patch in patches]


def _mark_one(patch: _Patch, path: Path) -> bool:
    display_dir = patch.plain.get(path.parent)
    if display_dir is not None and not path.name.startswith(".."):
        patch.set_file(display_dir, path.name, _UNKNOWN_ENTRY)
        return True
    watched = patch.directories | patch.scan.name_watches.keys()
    if path.parent in watched or path in watched or path == patch.scan.root.path:
        patch.set_file(str(patch.scan.root.path), "", _UNKNOWN_ENTRY)
        return True
    return False
