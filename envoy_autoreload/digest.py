"""What the watched configuration *is*: one walk that finds every directory to watch and
hashes every file, so that content, not events, decides whether to restart.

Why one walk does both: the walk tells the watcher about each directory *before* it lists
it, so any file created after the listing raises an event and any file created before
is in the listing; there is no gap to lose a change in.

Why content: a `touch`, a chmod, a same-bytes rewrite by a config push, or a file saved
twice by an editor must not restart Envoy. The digest follows symlinks, so a kubelet
ConfigMap update (a new `..<timestamp>` directory and `..data` renamed to point at it)
changes the digest exactly when the visible files' bytes change. Entries whose name
starts with `..` are walked (to be watched) but not hashed under their own names: their
content is what the visible `key -> ..data/key` symlinks show, and their timestamped
names change on every update.

Cost: a stat per file per settled burst; a file is read again only when its stat
(device, inode, size, mtime, ctime) changed, so a big Envoy binary is hashed once.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from envoy_autoreload.watch.filters import NoiseFilter

MAX_SYMLINK_HOPS: Final = 40
RACY_WINDOW_S: Final = 2.0

# Called for each directory before it is listed: (directory, names) where names is None
# for "everything in it matters" and a set of entry names for a symlink chain's parents.
DirectoryCallback = Callable[[Path, frozenset[str] | None], None]

_StatKey = tuple[int, int, int, int, int]


@dataclass(frozen=True, slots=True)
class WatchRoot:
    """A path the user asked us to watch: a file, or a directory tree."""

    path: Path
    label: str = ""


@dataclass(frozen=True)
class Snapshot:
    """The watched content at one moment."""

    files: Mapping[str, str]
    digest: str
    directories: frozenset[Path]
    watch_points: int = 0  # directories a watcher needs: the trees plus symlink-chain parents
    unreadable: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()

    def changed_since(self, other: Snapshot | None) -> list[str]:
        """Paths added, removed or modified relative to `other`, sorted."""
        if other is None:
            return sorted(self.files)
        keys = self.files.keys() | other.files.keys()
        return sorted(k for k in keys if self.files.get(k) != other.files.get(k))


@dataclass
class _Walk:
    on_directory: DirectoryCallback
    files: dict[str, str] = field(default_factory=dict)
    directories: set[Path] = field(default_factory=set)
    name_watches: dict[Path, set[str]] = field(default_factory=dict)
    visited: set[tuple[int, int]] = field(default_factory=set)
    unreadable: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    cache: dict[str, tuple[_StatKey, str]] = field(default_factory=dict)


def resolution_hops(path: Path) -> tuple[list[tuple[Path, str]], Path]:
    """The (directory, name) entries whose change can change what `path` resolves to:
    its own last component and every symlink met on the way, plus the final real path.

    A kubelet mount gives `envoy.yaml -> ..data/envoy.yaml` and `..data -> ..2024_...`:
    watching `(mount, "envoy.yaml")`, `(mount, "..data")` and the final file catches the
    swap, which replaces neither the file we opened nor its directory.
    """
    hops: list[tuple[Path, str]] = []
    pending = list(Path(os.path.abspath(path)).parts)
    current = Path(pending.pop(0))
    budget = MAX_SYMLINK_HOPS
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        candidate = current / name
        try:
            target = os.readlink(candidate)
        except OSError:
            if not pending:
                hops.append((current, name))
            current = candidate
            continue
        hops.append((current, name))
        budget -= 1
        if budget == 0:
            break
        target_path = Path(target)
        if target_path.is_absolute():
            current = Path(target_path.anchor)
            pending = list(target_path.parts[1:]) + pending
        else:
            pending = list(target_path.parts) + pending
    return hops, current


class ContentScanner:
    """Walks the watch roots; keeps a stat cache so unchanged files are not re-read."""

    def __init__(self, roots: Iterable[WatchRoot], noise: NoiseFilter) -> None:
        self.roots = tuple(roots)
        self._noise = noise
        self._cache: dict[str, tuple[_StatKey, str]] = {}

    def scan(self, on_directory: DirectoryCallback | None = None) -> Snapshot:
        walk = _Walk(on_directory or (lambda _path, _names: None))
        for root in self.roots:
            self._scan_root(root, walk)
        self._cache = walk.cache
        hasher = hashlib.sha256()
        for name in sorted(walk.files):
            hasher.update(f"{name}\0{walk.files[name]}\n".encode(errors="surrogateescape"))
        return Snapshot(
            files=dict(walk.files),
            digest=hasher.hexdigest(),
            directories=frozenset(walk.directories),
            watch_points=len(walk.directories | walk.name_watches.keys()),
            unreadable=tuple(walk.unreadable),
            missing=tuple(walk.missing),
        )

    def _watch_chain(self, path: Path, walk: _Walk) -> Path:
        """Name-watch every (directory, entry) a path resolves through; its real path."""
        hops, real = resolution_hops(path)
        for directory, name in hops:
            known = walk.name_watches.setdefault(directory, set())
            if name not in known:
                known.add(name)
                walk.on_directory(directory, frozenset(known))
        return real

    def _scan_root(self, root: WatchRoot, walk: _Walk) -> None:
        real = self._watch_chain(root.path, walk)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            walk.missing.append(str(root.path))
            return
        except OSError as err:  # permission, a symlink loop (ELOOP), ENOTDIR races
            walk.unreadable.append(f"{root.path} ({err.strerror})")
            return
        if stat.S_ISDIR(st.st_mode):
            self._walk_directory(str(root.path), real, st, walk, hidden=False)
        elif stat.S_ISREG(st.st_mode):
            self._add_file(str(root.path), real, st, walk)

    def _walk_directory(
        self, display: str, real: Path, st: os.stat_result, walk: _Walk, *, hidden: bool
    ) -> None:
        key = (st.st_dev, st.st_ino)
        if key in walk.visited:
            return
        walk.visited.add(key)
        walk.on_directory(real, None)
        try:
            entries = sorted(os.scandir(real), key=lambda e: e.name)
        except FileNotFoundError:
            return
        except OSError:
            walk.unreadable.append(display)
            return
        walk.directories.add(real)
        for entry in entries:
            name = entry.name
            if self._noise.is_noise(name):
                continue
            child_display = f"{display}/{name}"
            try:
                child_st = os.stat(entry.path)
            except FileNotFoundError:
                continue  # vanished, or a dangling symlink
            except OSError as err:  # permission, a symlink loop (ELOOP)
                walk.unreadable.append(f"{child_display} ({err.strerror})")
                continue
            child_hidden = hidden or name.startswith("..")
            if not child_hidden and entry.is_symlink():
                # A link out of the tree (certbot's live/ -> archive/): watch where it
                # leads, or a renewal there would never be seen.
                self._watch_chain(Path(entry.path), walk)
            if stat.S_ISDIR(child_st.st_mode):
                child_real = Path(os.path.realpath(entry.path))
                self._walk_directory(child_display, child_real, child_st, walk, hidden=child_hidden)
            elif stat.S_ISREG(child_st.st_mode) and not child_hidden:
                self._add_file(child_display, Path(entry.path), child_st, walk)

    def _add_file(self, display: str, path: Path, st: os.stat_result, walk: _Walk) -> None:
        stat_key: _StatKey = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self._cache.get(display)
        if cached is not None and cached[0] == stat_key:
            content_hash = cached[1]
        else:
            try:
                with open(path, "rb") as handle:
                    content_hash = hashlib.file_digest(handle, "sha256").hexdigest()
            except FileNotFoundError:
                return
            except OSError as err:
                walk.unreadable.append(f"{display} ({err.strerror})")
                return
        # Timestamps are coarse: a rewrite of the same size within the same tick keeps
        # the stat key. Like git's "racily clean" entries, a file modified in the last
        # seconds is not trusted from the cache; it is read again next time.
        if time.time() - st.st_mtime > RACY_WINDOW_S:
            walk.cache[display] = (stat_key, content_hash)
        walk.files[display] = content_hash
