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

Bounds, because the walk and the hashing run on the daemon's only loop (review #12, #13):
- a file found by walking a tree and larger than `MAX_HASHED_BYTES` is compared by its
  stat (device, inode, size, mtime), not read: a symlink to a disk image must not stall
  the loop. Files named as roots (`--config`, the Envoy binary, a `--watch` file) are
  always hashed: the user named them, and the Envoy binary (~100 MiB) must compare by
  content so a reinstall of the same bytes restarts nothing;
- a symlinked directory that leads to an ancestor of the directory holding it (`/`, or
  `..`) is not walked: it would walk the whole tree, or the machine, again;
- under a symlinked directory (certbot's `live/ -> ../archive`), at most
  `MAX_LINKED_ENTRIES` entries are walked; the rest is neither watched nor hashed;
- the walk keeps its own stack, not Python's: a tree deeper than the recursion limit
  (~1000) is walked like any other.
Each bound is named in the snapshot (`by_stat`, `not_walked`) so the watcher can warn.
"""

from __future__ import annotations

import errno
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
# 64 MiB: hashed in ~0.15 s; a config, a certificate or a Lua script is far smaller.
MAX_HASHED_BYTES: Final = 64 * 1024 * 1024
# Entries (files and directories) walked behind one symlinked directory: a certificate
# archive or a shared include directory fits; `/usr` does not.
MAX_LINKED_ENTRIES: Final = 10_000
# Rounds of "resolve, watch, resolve again" for one path; a second identical answer
# proves every hop was watched before it was read (see `ContentScanner._watch_chain`).
MAX_RESOLVE_ROUNDS: Final = 4

# Called for each directory before it is listed: (directory, names) where names is None
# for "everything in it matters" and a set of entry names for a symlink chain's parents.
DirectoryCallback = Callable[[Path, frozenset[str] | None], None]

_StatKey = tuple[int, int, int, int, int]
_Hop = tuple[Path, str]


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
    # Directories watched only for some names (symlink chains, ancestors of a missing path).
    name_watched: frozenset[Path] = frozenset()
    by_stat: tuple[str, ...] = ()  # files over MAX_HASHED_BYTES, compared by stat
    not_walked: tuple[str, ...] = ()  # symlinked directories skipped or cut short, and why
    files_read: int = 0  # files read and hashed by this scan (the rest came from the cache)

    def changed_since(self, other: Snapshot | None) -> list[str]:
        """Paths added, removed or modified relative to `other`, sorted."""
        if other is None:
            return sorted(self.files)
        keys = self.files.keys() | other.files.keys()
        return sorted(k for k in keys if self.files.get(k) != other.files.get(k))


@dataclass(slots=True)
class _Budget:
    """Entries still allowed behind one symlinked directory."""

    link: str
    remaining: int = MAX_LINKED_ENTRIES

    @property
    def exhausted(self) -> bool:
        return self.remaining < 0

    def take(self, walk: _Walk) -> bool:
        """Count one entry; False (and one report) once the budget is spent."""
        if self.remaining < 0:
            return False
        self.remaining -= 1
        if self.remaining >= 0:
            return True
        walk.not_walked.append(
            f"{self.link} (more than {MAX_LINKED_ENTRIES} entries behind a symlink; "
            "the rest is not watched)"
        )
        return False


@dataclass(frozen=True, slots=True)
class _Directory:
    """A directory waiting on the walk's stack."""

    display: str
    real: Path
    st: os.stat_result
    hidden: bool
    budget: _Budget | None


@dataclass
class _Walk:
    on_directory: DirectoryCallback
    now_ns: int
    excluded: frozenset[str] = frozenset()
    files: dict[str, str] = field(default_factory=dict)
    directories: set[Path] = field(default_factory=set)
    name_watches: dict[Path, set[str]] = field(default_factory=dict)
    visited: set[tuple[int, int]] = field(default_factory=set)
    unreadable: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    by_stat: list[str] = field(default_factory=list)
    not_walked: list[str] = field(default_factory=list)
    files_read: int = 0
    cache: dict[str, tuple[_StatKey, str]] = field(default_factory=dict)


def resolution_hops(path: Path) -> tuple[list[_Hop], Path]:
    """The (directory, name) entries whose change can change what `path` resolves to:
    its own last component and every symlink met on the way, plus the final real path.

    A kubelet mount gives `envoy.yaml -> ..data/envoy.yaml` and `..data -> ..2024_...`:
    watching `(mount, "envoy.yaml")`, `(mount, "..data")` and the final file catches the
    swap, which replaces neither the file we opened nor its directory.

    A component that does not exist ends the walk with one hop: the deepest existing
    ancestor, watched for that name. Watching only the missing path's own directory
    would fail (it does not exist either) and nothing would ever report the tree's
    arrival (review #7: `--watch /srv/app/conf` before `/srv/app` exists, or a
    blue/green swap of `/srv/app` that leaves a gap). When the name appears, the rescan
    resolves one step further and watches there.
    """
    hops: list[_Hop] = []
    pending = list(Path(os.path.abspath(path)).parts)
    current = Path(pending.pop(0))
    entered: _Hop | None = None  # the entry that made `current`, for ENOTDIR
    budget = MAX_SYMLINK_HOPS
    while pending:
        name = pending.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current, entered = current.parent, None
            continue
        candidate = current / name
        try:
            target = os.readlink(candidate)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                # ENOTDIR: `current` is a file; its own entry is what must change.
                missing_hop = entered if err.errno == errno.ENOTDIR and entered else None
                hops.append(missing_hop or (current, name))
                return hops, candidate.joinpath(*pending)
            # EINVAL: it exists and is no symlink. EACCES, ENAMETOOLONG: the stat of the
            # result reports them.
            if not pending:
                hops.append((current, name))
            current, entered = candidate, (current, name)
            continue
        hops.append((current, name))
        budget -= 1
        if budget == 0:
            break
        target_path = Path(target)
        if target_path.is_absolute():
            current, entered = Path(target_path.anchor), None
            pending = list(target_path.parts[1:]) + pending
        else:
            pending = list(target_path.parts) + pending
    return hops, current


def can_cache_hash(st: os.stat_result, now_ns: int) -> bool:
    """Whether a file's hash may be trusted from the stat cache next time.

    Timestamps are coarse: a same-size rewrite within the same clock tick as our read
    keeps the whole stat key, so, like git's "racily clean" index entries, a file
    changed within `RACY_WINDOW_S` of now is read again next time.

    "Changed" is the newer of mtime and ctime. mtime alone is wrong both ways (review
    #15): `cp -p` or `rsync -t` back-date it, so a file written a moment ago looked old
    and was cached; and a file with a future mtime (a skewed build machine) was never
    cached, so a 100 MiB Envoy binary was re-read on every scan. The kernel sets ctime
    from its own clock on every change, mtime updates included, and nobody can set it.
    A future mtime is ignored: any later write resets mtime to now, which changes the
    stat key, so it cannot hide a change. A ctime in the future (the wall clock stepped
    back) is never cached until the clock passes it.
    """
    changed_ns = st.st_ctime_ns if st.st_mtime_ns > now_ns else max(st.st_mtime_ns, st.st_ctime_ns)
    return now_ns - changed_ns > RACY_WINDOW_S * 1_000_000_000


def _stat_key(st: os.stat_result) -> _StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ContentScanner:
    """Walks the watch roots; keeps a stat cache so unchanged files are not re-read."""

    def __init__(self, roots: Iterable[WatchRoot], noise: NoiseFilter) -> None:
        self.roots = tuple(roots)
        self._noise = noise
        self._cache: dict[str, tuple[_StatKey, str]] = {}
        # Exact paths left out of the digest (files Envoy itself writes, review #15).
        self.excluded: frozenset[str] = frozenset()

    def scan(self, on_directory: DirectoryCallback | None = None) -> Snapshot:
        walk = _Walk(on_directory or (lambda _path, _names: None), time.time_ns(), self.excluded)
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
            name_watched=frozenset(walk.name_watches),
            by_stat=tuple(walk.by_stat),
            not_walked=tuple(walk.not_walked),
            files_read=walk.files_read,
        )

    def _watch_chain(self, path: Path, walk: _Walk) -> Path:
        """Name-watch every (directory, entry) a path resolves through; its real path.

        Resolving and watching are two steps, and the tree may change between them (a
        `mkdir -p` racing the walk). So resolve again after watching: when no new hop
        turns up, every hop of this answer was watched before it was read, and any
        later change raises an event (inotify(7): a watch sees what happens after it).
        """
        real = path
        for _round in range(MAX_RESOLVE_ROUNDS):
            hops, real = resolution_hops(path)
            added = False
            for directory, name in hops:
                known = walk.name_watches.setdefault(directory, set())
                if name not in known:
                    known.add(name)
                    added = True
                    walk.on_directory(directory, frozenset(known))
            if not added:
                break
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
            self._walk_tree(_Directory(str(root.path), real, st, False, None), walk)
        elif stat.S_ISREG(st.st_mode):
            self._add_file(str(root.path), real, st, walk, bounded=False)

    def _walk_tree(self, top: _Directory, walk: _Walk) -> None:
        """Depth-first, in name order, on an explicit stack: no recursion limit."""
        stack = [top]
        while stack:
            subdirectories = self._list_directory(stack.pop(), walk)
            stack.extend(reversed(subdirectories))

    def _list_directory(self, directory: _Directory, walk: _Walk) -> list[_Directory]:
        """Watch, then list one directory; hash its files; return its subdirectories."""
        key = (directory.st.st_dev, directory.st.st_ino)
        if key in walk.visited:
            return []
        walk.visited.add(key)
        if directory.budget is not None and directory.budget.exhausted:
            return []
        walk.on_directory(directory.real, None)
        try:
            entries = sorted(os.scandir(directory.real), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        except OSError:
            walk.unreadable.append(directory.display)
            return []
        walk.directories.add(directory.real)
        subdirectories: list[_Directory] = []
        for entry in entries:
            if self._noise.is_noise(entry.name):
                continue
            if directory.budget is not None and not directory.budget.take(walk):
                break
            child = self._visit_entry(directory, entry, walk)
            if child is not None:
                subdirectories.append(child)
        return subdirectories

    def _visit_entry(
        self, parent: _Directory, entry: os.DirEntry[str], walk: _Walk
    ) -> _Directory | None:
        """Hash a file entry; return a directory entry for the walk to visit."""
        display = f"{parent.display}/{entry.name}"
        hidden = parent.hidden or entry.name.startswith("..")
        is_link = entry.is_symlink()
        if is_link and not hidden:
            # A link out of the tree (certbot's live/ -> archive/): watch where it
            # leads, or a renewal there would never be seen. Dangling ones too: the
            # chain ends at the deepest existing ancestor of the missing target.
            self._watch_chain(Path(entry.path), walk)
        try:
            st = os.stat(entry.path)
        except FileNotFoundError:
            return None  # vanished, or a dangling symlink
        except OSError as err:  # permission, a symlink loop (ELOOP)
            walk.unreadable.append(f"{display} ({err.strerror})")
            return None
        if stat.S_ISDIR(st.st_mode):
            if not is_link:  # the parent's path is real already: no realpath (O(depth))
                real = parent.real / entry.name
                return _Directory(display, real, st, hidden, parent.budget)
            real = Path(os.path.realpath(entry.path))
            if (st.st_dev, st.st_ino) in walk.visited:
                return None  # a link back into what was walked already
            if parent.real.is_relative_to(real):
                walk.not_walked.append(f"{display} (a symlink to {real}, which contains it)")
                return None
            budget = parent.budget or _Budget(display)
            return _Directory(display, real, st, hidden, budget)
        if stat.S_ISREG(st.st_mode) and not hidden:
            self._add_file(display, Path(entry.path), st, walk, bounded=True)
        return None

    def _add_file(
        self, display: str, path: Path, st: os.stat_result, walk: _Walk, *, bounded: bool
    ) -> None:
        if display in walk.excluded or str(path) in walk.excluded:
            return
        if bounded and st.st_size > MAX_HASHED_BYTES:
            # Not read: by identity and modification, so a replacement or a write shows.
            walk.files[display] = f"stat {st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
            walk.by_stat.append(display)
            return
        stat_key = _stat_key(st)
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
            walk.files_read += 1
        if can_cache_hash(st, walk.now_ns):
            walk.cache[display] = (stat_key, content_hash)
        walk.files[display] = content_hash
