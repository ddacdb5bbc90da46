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
    """One root's scan being updated in place of a rescan. File entries are buffered
    per directory and written in one update each: a 10,000-file burst into one
    directory is one new map for it, not 10,000."""

    scan: RootScan
    excluded: frozenset[str]
    tree: immutables.Map[str, DirMap] = field(init=False)
    total: int = field(init=False)
    count: int = field(init=False)
    directories: set[Path] = field(init=False)
    plain: immutables.Map[str, str] = field(init=False)
    unreadable: list[str] = field(init=False)
    by_stat: list[str] = field(init=False)
    _pending: dict[str, dict[str, bytes | None]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        scan = self.scan
        self.tree = scan.tree
        self.total, self.count = scan.total, scan.count
        self.directories = set(scan.directories)
        self.plain = scan.plain
        self.unreadable = list(scan.unreadable)
        self.by_stat = list(scan.by_stat)

    def set_file(self, display_dir: str, name: str, entry: bytes | None) -> None:
        """Put (or with None, drop) one file's entry; applied by `flush`."""
        self._pending.setdefault(display_dir, {})[name] = entry

    def flush(self) -> None:
        """Write the buffered entries, keeping the digest sum and the count."""
        pending, self._pending = self._pending, {}
        for display_dir, changes in pending.items():
            names = self.tree.get(display_dir) or immutables.Map()
            mutation = names.mutate()
            for name, entry in changes.items():
                display = f"{display_dir}/{name}"
                old = mutation.get(name)
                if old is not None:
                    self.total -= contribution(display, content_of(old))
                    self.count -= 1
                    mutation.pop(name)
                if entry is not None:
                    mutation.set(name, entry)
                    self.total += contribution(display, content_of(entry))
                    self.count += 1
            names = mutation.finish()
            if len(names):
                self.tree = self.tree.set(display_dir, names)
            elif display_dir in self.tree:
                self.tree = self.tree.delete(display_dir)

    def drop_tree(self, real: str, display: str) -> None:
        """Forget a directory and everything below it (deleted or moved away)."""
        self.flush()
        prefix = display + "/"
        for directory in [d for d in self.tree if d == display or d.startswith(prefix)]:
            for name, entry in self.tree[directory].items():
                self.total -= contribution(f"{directory}/{name}", content_of(entry))
                self.count -= 1
            self.tree = self.tree.delete(directory)
        below = real + "/"
        for path in [p for p in self.plain if p == real or p.startswith(below)]:
            self.plain = self.plain.delete(path)
        gone = Path(real)
        self.directories = {d for d in self.directories if not d.is_relative_to(gone)}

    def merge(self, sub: RootScan) -> None:
        """Add a subtree walked on its own (a directory that appeared)."""
        self.flush()
        self.tree = self.tree.update(sub.tree)
        self.total += sub.total
        self.count += sub.count
        self.directories |= sub.directories
        self.plain = self.plain.update(sub.plain)
        self.unreadable += sub.unreadable
        self.by_stat += sub.by_stat

    def forget_reports(self, display: str) -> None:
        """A file read again is no longer unreadable or too big until it says so."""
        if self.unreadable:
            self.unreadable = [u for u in self.unreadable if not u.startswith(display + " (")]
        if self.by_stat:
            self.by_stat = [b for b in self.by_stat if b != display]

    def finish(self) -> RootScan:
        self.flush()
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
        self._views: dict[int, _View] = {}
        self._now_ns = time.time_ns()

    def apply(self, paths: Iterable[str]) -> tuple[list[RootScan], set[int]]:
        """Patched scans, and the indexes of the roots to rescan instead. `paths` come
        parents before their children (`watch/pending.py`), and are read lazily: an
        iterator that stops on a deadline ends the slice."""
        rescan: set[int] = set()
        roots = range(len(self._scanner.roots))
        for raw in paths:
            parent, _sep, name = raw.rpartition("/")
            claimed = False
            for index in roots:
                if index in rescan:
                    claimed = True
                    continue
                outcome = self._apply_to_root(index, raw, parent or "/", name)
                claimed = claimed or outcome is not None
                if outcome is False:
                    rescan.add(index)
            if not claimed:
                rescan.update(roots)
        patched = [p.finish() for i, p in self._patches.items() if i not in rescan]
        return patched, rescan

    def _apply_to_root(self, index: int, raw: str, parent: str, name: str) -> bool | None:
        """True: applied; False: the root must be rescanned; None: not this root's."""
        patch = self._patches.get(index)
        scan = patch.scan if patch is not None else self._scanner.cached(self._scanner.roots[index])
        if scan is None:
            return False
        view = self._views.get(index) or self._views.setdefault(index, _View.of(scan))
        plain = patch.plain if patch is not None else scan.plain
        display_dir = plain.get(parent)
        if display_dir is not None and not name.startswith(".."):
            if self._scanner.noise.is_noise(name):
                return True
            if view.through_a_link(raw, parent, name) or (raw not in plain and raw in view.dirs):
                return False
            if patch is None:
                patch = self._patches[index] = _Patch(scan, self._scanner.excluded)
            return self._update(patch, display_dir, raw, name)
        if parent in view.dirs or raw in view.dirs or raw == view.root:
            return False
        if parent in view.hops or raw in view.hops or view.leads_to_a_link_target(raw):
            return False
        return None

    def _update(self, patch: _Patch, display_dir: str, raw: str, name: str) -> bool:
        display = f"{display_dir}/{name}"
        try:
            st = os.lstat(raw)
        except OSError:
            st = None  # gone (or unreadable: the rescan of a settle reports it)
        if st is not None and stat.S_ISLNK(st.st_mode):
            return False  # where it leads is the walk's business
        patch.set_file(display_dir, name, None)
        patch.forget_reports(display)
        if raw in patch.plain or st is None or stat.S_ISDIR(st.st_mode):
            patch.drop_tree(raw, display)
        if st is None:
            return True
        if stat.S_ISDIR(st.st_mode):
            return self._walk_new(patch, WalkDirectory(display, Path(raw), st, False, None))
        if stat.S_ISREG(st.st_mode) and display not in patch.excluded and raw not in patch.excluded:
            hashing = FileHashing(None, self._now_ns, patch.excluded)
            patch.set_file(display_dir, name, hashing.entry_for(display, raw, True))
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


@dataclass(frozen=True, slots=True)
class _View:
    """A root's walked directories, name watches and link targets as strings: asked
    for every event of a burst, where a Path per question cost more than the rest."""

    root: str
    dirs: frozenset[str]
    hops: dict[str, frozenset[str]]
    targets: frozenset[str]

    @classmethod
    def of(cls, scan: RootScan) -> _View:
        return cls(
            str(scan.root.path),
            frozenset(str(d) for d in scan.directories),
            {str(d): names for d, names in scan.name_watches.items()},
            scan.link_targets,
        )

    def through_a_link(self, raw: str, parent: str, name: str) -> bool:
        """Whether the entry is also reached through a symlink: a hop of a chain the
        walk resolved (a link to this file, or a dangling one to this name), or on the
        way to a link's target. Those paths change with it, and only the root's walk
        knows them. (A directory the walk entered through a link is not plain: the
        caller checks.)"""
        hops = self.hops.get(parent)
        return (hops is not None and name in hops) or self.leads_to_a_link_target(raw)

    def leads_to_a_link_target(self, raw: str) -> bool:
        """A symlink's target, or a directory on the way to one (renamed, the link
        dangles: the walk resolves only the chain's links and last entry by name)."""
        if not self.targets:
            return False
        below = raw + "/"
        return any(t == raw or t.startswith(below) for t in self.targets)


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
    views = [_View.of(scan) for scan in scans]
    for raw in sorted(touched):
        path = Path(raw)
        claimed = [p for p, v in zip(patches, views, strict=True) if _mark_one(p, v, path)]
        if not claimed:
            for patch in patches:
                patch.set_file(str(patch.scan.root.path), "", _UNKNOWN_ENTRY)
    return [patch.finish() for patch in patches]


def _mark_one(patch: _Patch, view: _View, path: Path) -> bool:
    raw, parent, name = str(path), str(path.parent), path.name
    display_dir = patch.plain.get(parent)
    if (
        display_dir is not None
        and not name.startswith("..")
        and not view.through_a_link(raw, parent, name)
        and not (raw not in patch.plain and raw in view.dirs)
    ):
        patch.set_file(display_dir, name, _UNKNOWN_ENTRY)
        return True
    claimed = (
        parent in view.dirs
        or raw in view.dirs
        or raw == view.root
        or parent in view.hops
        or raw in view.hops
        or view.leads_to_a_link_target(raw)
    )
    if claimed:
        patch.set_file(view.root, "", _UNKNOWN_ENTRY)
    return claimed
