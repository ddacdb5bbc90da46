"""What a snapshot of the watched content holds, and why keeping many of them is cheap.

A snapshot is kept for every generation (what it started from), for the pinned content
of a validation and for the scan in progress; with 100,000 watched files a plain dict
per snapshot cost ~15-20 MB each (issue 16). So the files live in persistent maps
(`immutables.Map`, a HAMT, the structure behind `contextvars`): a change to one file
makes a new map that shares everything else with the old one, and two snapshots are
compared directory by directory, skipping every directory whose map is the same object.

Per watch root the tree is two levels, directory display path -> {file name -> entry};
an entry packs the stat key the next scan compares (so an unchanged file is not read
again) with the content's sha256, about 100 bytes a file in all.

The digest is additive (the sum, modulo 2**256, of one sha256 per (path, content)):
updating it for one changed file costs one hash, not a pass over the whole tree. It only
ever answers "did the content change", for content nobody crafts against us; a
snapshot of Envoy's config that is started is named by its own sha256 (generations.py).
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import immutables

# dev, ino, size, mtime_ns, ctime_ns, and whether the content may be trusted from the
# stat next time (`digest.can_cache_hash`); the content hash follows.
_STAT: Final = struct.Struct("<QQqqq?")
_HASH_AT: Final = _STAT.size
_MODULUS: Final = 1 << 256
# What a reference holds for a file that may have changed after Envoy read it: equal to
# no real content, so the next comparison reports the file as changed.
UNKNOWN: Final = b"\xff" * 32

DirMap = immutables.Map[str, bytes]
Tree = immutables.Map[str, DirMap]


def make_entry(st: os.stat_result, content: bytes, *, trusted: bool) -> bytes:
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, trusted)
    return _STAT.pack(*key) + content


def content_of(entry: bytes) -> bytes:
    return entry[_HASH_AT:]


def reusable(entry: bytes | None, st: os.stat_result) -> bytes | None:
    """The entry's content when the file's stat is what it was and it was trusted."""
    if entry is None:
        return None
    dev, ino, size, mtime_ns, ctime_ns, trusted = _STAT.unpack_from(entry)
    same = (dev, ino, size, mtime_ns, ctime_ns) == (
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )
    return entry[_HASH_AT:] if same and trusted else None


def contribution(display: str, content: bytes) -> int:
    """One file's share of the digest: its path and content, hashed together."""
    data = display.encode("utf-8", "surrogateescape") + b"\0" + content
    return int.from_bytes(hashlib.sha256(data).digest(), "big")


def digest_of(total: int) -> str:
    return f"{total % _MODULUS:064x}"


def digest_of_files(files: Mapping[str, str]) -> str:
    """The digest of {path: content sha256 in hex}: what a handed-over snapshot is worth
    to this image, whatever digest the image before it computed."""
    return digest_of(sum(contribution(path, _content_bytes(h)) for path, h in files.items()))


def _content_bytes(text: str) -> bytes:
    """A hash as `FilesView` spells it (hex), or any other text as itself."""
    try:
        return bytes.fromhex(text)
    except ValueError:
        return text.encode("utf-8", "surrogateescape")


def split_display(display: str) -> tuple[str, str]:
    directory, _sep, name = display.rpartition("/")
    return directory, name


@dataclass(frozen=True, slots=True)
class WatchRoot:
    """A path the user asked us to watch: a file, or a directory tree."""

    path: Path
    label: str = ""


@dataclass(frozen=True, slots=True)
class RootScan:
    """One watch root as the last walk or event left it."""

    root: WatchRoot
    tree: Tree = field(default_factory=immutables.Map)
    total: int = 0  # the digest sum of its files
    count: int = 0
    directories: frozenset[Path] = frozenset()
    # Directories where an event names exactly the file that changed (no symlink, no
    # `..data` on the way): real path -> display path. Anything else rescans the root.
    plain: immutables.Map[str, str] = field(default_factory=immutables.Map)
    name_watches: Mapping[Path, frozenset[str]] = field(default_factory=dict)
    unreadable: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    by_stat: tuple[str, ...] = ()
    not_walked: tuple[str, ...] = ()
    # Where symlinks met by the walk lead (real paths): a change at or above one of
    # them changes paths the walk shows under the link's name.
    link_targets: frozenset[str] = frozenset()
    files_read: int = 0

    def entry(self, display: str) -> bytes | None:
        directory, name = split_display(display)
        names = self.tree.get(directory)
        return None if names is None else names.get(name)


class FilesView(Mapping[str, str]):
    """{display path: content sha256 in hex} over the roots' trees, without copying them
    (the first root to name a path wins, as in the digest's own walk order)."""

    def __init__(self, scans: tuple[RootScan, ...]) -> None:
        self._scans = scans
        self._length: int | None = None

    def __getitem__(self, display: str) -> str:
        for scan in self._scans:
            entry = scan.entry(display)
            if entry is not None:
                return content_of(entry).hex()
        raise KeyError(display)

    def __iter__(self) -> Iterator[str]:
        seen: set[str] | None = set() if len(self._scans) > 1 else None
        for scan in self._scans:
            for directory, names in scan.tree.items():
                for name in names:
                    display = f"{directory}/{name}"
                    if seen is not None:
                        if display in seen:
                            continue
                        seen.add(display)
                    yield display

    def __len__(self) -> int:
        if self._length is None:
            self._length = sum(1 for _ in self)
        return self._length


@dataclass(frozen=True)
class Snapshot:
    """The watched content at one moment."""

    files: Mapping[str, str]
    digest: str
    directories: frozenset[Path]
    watch_points: int = 0  # directories a watcher needs: the trees plus symlink-chain parents
    unreadable: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    # Directories watched only for some names (symlink chains, ancestors of a missing path).
    name_watched: frozenset[Path] = frozenset()
    by_stat: tuple[str, ...] = ()  # files over MAX_HASHED_BYTES, compared by stat
    not_walked: tuple[str, ...] = ()  # symlinked directories skipped or cut short, and why
    files_read: int = 0  # files read and hashed by this scan (the rest came from the cache)
    scans: tuple[RootScan, ...] = ()  # the trees behind `files`, for a cheap comparison
    count: int = 0  # len(files), known without walking `files` when built from scans

    @classmethod
    def of(cls, scans: tuple[RootScan, ...], *, files_read: int = 0) -> Snapshot:
        directories = frozenset().union(*(s.directories for s in scans))
        name_watched = frozenset().union(*(s.name_watches.keys() for s in scans))
        total, count = _unique_sum(scans)
        return cls(
            files=FilesView(scans),
            digest=digest_of(total),
            count=count,
            directories=directories,
            watch_points=len(directories | name_watched),
            unreadable=tuple(p for s in scans for p in s.unreadable),
            missing=tuple(p for s in scans for p in s.missing),
            name_watched=name_watched,
            by_stat=tuple(p for s in scans for p in s.by_stat),
            not_walked=tuple(p for s in scans for p in s.not_walked),
            files_read=files_read,
            scans=scans,
        )

    @property
    def file_count(self) -> int:
        return self.count if self.scans else len(self.files)

    def changed_since(self, other: Snapshot | None) -> list[str]:
        """Paths added, removed or modified relative to `other`, sorted."""
        if other is None:
            return sorted(self.files)
        mine, theirs = self.scans, other.scans
        if (
            mine
            and len(mine) == len(theirs)
            and all(a.root == b.root for a, b in zip(mine, theirs, strict=True))
        ):
            changed: set[str] = set()
            for a, b in zip(mine, theirs, strict=True):
                changed.update(_tree_changes(a.tree, b.tree))
            return sorted(changed)
        keys = self.files.keys() | other.files.keys()
        return sorted(k for k in keys if self.files.get(k) != other.files.get(k))


def _unique_sum(scans: tuple[RootScan, ...]) -> tuple[int, int]:
    """The digest sum and file count of `FilesView(scans)`: a path two roots share
    (`--config` inside a `--watch` directory) counts once, as the first root has it,
    so a handed-over `files` map digests the same (`digest_of_files`). Only roots whose
    paths nest can share a path, so only those are compared."""
    total = sum(s.total for s in scans)
    count = sum(s.count for s in scans)
    for index, later in enumerate(scans):
        earlier = [s for s in scans[:index] if _nested(s.root.path, later.root.path)]
        if not earlier:
            continue
        for directory, names in later.tree.items():
            for name, entry in names.items():
                display = f"{directory}/{name}"
                if any(s.entry(display) is not None for s in earlier):
                    total -= contribution(display, content_of(entry))
                    count -= 1
    return total, count


@functools.cache
def _nested(a: Path, b: Path) -> bool:
    """Asked for every pair of roots at every snapshot, one per slice of a burst: two
    `is_relative_to` a pair were a sixth of a 10,000-file burst's loop time (issue 16).
    The roots are few and fixed, so the answers are kept."""
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _tree_changes(new: Tree, old: Tree) -> Iterator[str]:
    """Paths whose content differs; a directory map shared by both is skipped whole."""
    if new is old:
        return
    for directory in set(new.keys()) | set(old.keys()):
        a, b = new.get(directory), old.get(directory)
        if a is b:
            continue
        a = a if a is not None else immutables.Map()
        b = b if b is not None else immutables.Map()
        for name in set(a.keys()) | set(b.keys()):
            x, y = a.get(name), b.get(name)
            if x is None or y is None or content_of(x) != content_of(y):
                yield f"{directory}/{name}"
