"""What the watched configuration *is*: one walk that finds and watches every directory,
then the hashing of every file it listed, so that content, not events, decides whether
to restart.

Why the walk watches as it goes: the watcher is told about each directory *before* it
is listed, so any file created after the listing raises an event and any file created
before is in the listing; there is no gap to lose a change in. Hashing comes after the
walk (`hash_listing`), possibly on a worker thread while Envoy already serves (issue
16): a file changed after it was listed raises an event, and the watcher has it. At
start-up the walk itself comes after epoch 0's spawn; what changed before the watch
reached it is found by its ctime (`changed_since.py`).

Why content: a `touch`, a chmod, a same-bytes rewrite by a config push, or a file saved
twice by an editor must not restart Envoy. The digest follows symlinks, so a kubelet
ConfigMap update (a new `..<timestamp>` directory and `..data` renamed to point at it)
changes the digest exactly when the visible files' bytes change. Entries whose name
starts with `..` are walked (to be watched) but not hashed under their own names: their
content is what the visible `key -> ..data/key` symlinks show, and their timestamped
names change on every update.

Cost: the previous scan of a root is the cache: a file is read again only when its stat
(device, inode, size, mtime, ctime) changed, so a big Envoy binary is hashed once.
After the first walk, an event that names a file in a plain directory (no symlink on
the way) updates that one entry (`apply`); anything else rescans the root it is in.

Bounds, because the walk and the hashing may run on the daemon's only loop (review #12,
#13):
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
import operator
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import immutables

from envoy_autoreload.changed_since import ChangedSince
from envoy_autoreload.content import (
    RootScan,
    Snapshot,
    WatchRoot,
    content_of,
    contribution,
    make_entry,
    reusable,
    split_display,
)
from envoy_autoreload.watch.filters import NoiseFilter

__all__ = ["ContentScanner", "Snapshot", "WatchRoot", "can_cache_hash", "resolution_hops"]

MAX_SYMLINK_HOPS: Final = 40
RACY_WINDOW_S: Final = 2.0
# 64 MiB: hashed in ~0.15 s; a config, a certificate or a Lua script is far smaller.
MAX_HASHED_BYTES: Final = 64 * 1024 * 1024
_READ_CHUNK: Final = 64 * 1024  # below malloc's mmap threshold: no mmap per read
# Entries (files and directories) walked behind one symlinked directory: a certificate
# archive or a shared include directory fits; `/usr` does not.
MAX_LINKED_ENTRIES: Final = 10_000
# Rounds of "resolve, watch, resolve again" for one path; a second identical answer
# proves every hop was watched before it was read (see `ContentScanner._watch_chain`).
MAX_RESOLVE_ROUNDS: Final = 4

# Called for each directory before it is listed: (directory, names) where names is None
# for "everything in it matters" and a set of entry names for a symlink chain's parents.
DirectoryCallback = Callable[[Path, frozenset[str] | None], None]

_Hop = tuple[Path, str]


def _no_watch(_path: Path, _names: frozenset[str] | None) -> None:
    return None


@dataclass(slots=True)
class _Budget:
    """Entries still allowed behind one symlinked directory."""

    link: str
    remaining: int = MAX_LINKED_ENTRIES

    @property
    def exhausted(self) -> bool:
        return self.remaining < 0

    def take(self, walk: Listing) -> bool:
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
class WalkDirectory:
    """A directory waiting on the walk's stack."""

    display: str
    real: Path
    st: os.stat_result
    hidden: bool
    budget: _Budget | None


@dataclass(slots=True)
class Batch:
    """Files of one directory to hash: their names, and where to read each (the same
    name in `real_dir`, unless `real_names` says otherwise: a root file reached through
    symlinks)."""

    display_dir: str
    real_dir: str
    names: list[str]
    bounded: bool
    real_names: list[str] | None = None


@dataclass
class Listing:
    """One root walked: every directory watched and listed, its files not read yet."""

    root: WatchRoot
    on_directory: DirectoryCallback
    excluded: frozenset[str] = frozenset()
    batches: list[Batch] = field(default_factory=list)
    directories: set[Path] = field(default_factory=set)
    plain: dict[str, str] = field(default_factory=dict)
    name_watches: dict[Path, set[str]] = field(default_factory=dict)
    visited: set[tuple[int, int]] = field(default_factory=set)
    unreadable: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    not_walked: list[str] = field(default_factory=list)
    link_targets: set[str] = field(default_factory=set)
    # The first walk after epoch 0's spawn: what changed before each watch was added.
    changed: ChangedSince | None = None


@dataclass
class FileHashing:
    """Phase two for one root: read what the listing found, reusing the cache."""

    cache: RootScan | None
    now_ns: int
    excluded: frozenset[str]
    dirs: dict[str, immutables.Map[str, bytes]] = field(default_factory=dict)
    total: int = 0
    count: int = 0
    unreadable: list[str] = field(default_factory=list)
    by_stat: list[str] = field(default_factory=list)
    files_read: int = 0
    changed: ChangedSince | None = None  # the first hashing after epoch 0's spawn

    def add_batch(self, batch: Batch) -> None:
        """One directory's files, made a persistent map at once: no dict of the whole
        tree is ever held beside it (RSS at 100,000 files, issue 16)."""
        entries: dict[str, bytes] = {}
        real_names = batch.real_names or batch.names
        for name, real_name in zip(batch.names, real_names, strict=True):
            display = f"{batch.display_dir}/{name}"
            path = f"{batch.real_dir}/{real_name}"
            if display in self.excluded or path in self.excluded:
                continue
            entry = self.entry_for(display, path, batch.bounded)
            if entry is not None:
                entries[name] = entry
        if not entries:
            return
        names = self.dirs.get(batch.display_dir, immutables.Map())
        for name, entry in entries.items():
            old = names.get(name)
            if old is not None:
                self.total -= contribution(f"{batch.display_dir}/{name}", content_of(old))
                self.count -= 1
            self.total += contribution(f"{batch.display_dir}/{name}", content_of(entry))
            self.count += 1
        self.dirs[batch.display_dir] = names.update(entries)

    def entry_for(self, display: str, path: str, bounded: bool) -> bytes | None:
        """The entry for one file as it is now; None when it is gone or not a file."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None  # vanished since the listing: its event follows
        except OSError as err:  # permission, a symlink loop (ELOOP)
            self.unreadable.append(f"{display} ({err.strerror})")
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        if self.changed is not None:
            self.changed.note(path, st)
        if bounded and st.st_size > MAX_HASHED_BYTES:
            # Not read: by identity and modification, so a replacement or a write shows.
            self.by_stat.append(display)
            mark = f"stat {st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
            return make_entry(st, hashlib.sha256(mark.encode()).digest(), trusted=False)
        trusted = can_cache_hash(st, self.now_ns)
        content = reusable(self.cache.entry(display) if self.cache else None, st)
        if content is not None:
            return make_entry(st, content, trusted=trusted)
        try:
            content = sha256_of(path)
        except FileNotFoundError:
            return None
        except OSError as err:
            self.unreadable.append(f"{display} ({err.strerror})")
            return None
        self.files_read += 1
        return make_entry(st, content, trusted=trusted)


def sha256_of(path: str) -> bytes:
    """The file's SHA-256, read through a small buffer: `hashlib.file_digest` allocates
    256 KiB per call, two thirds of the time to hash a config-sized file on a slow VM
    (29 against 9 us; issue 16, a 10,000-file burst). O_NONBLOCK: a file swapped for a
    FIFO since its stat fails to read instead of blocking the loop."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        sha = hashlib.sha256()
        while chunk := os.read(fd, _READ_CHUNK):
            sha.update(chunk)
        return sha.digest()
    finally:
        os.close(fd)


def hash_listing(
    listing: Listing, cache: RootScan | None, changed: ChangedSince | None = None
) -> RootScan:
    """Phase two: read and hash every file the walk listed. Touches nothing but the
    files and its own objects, so it may run on a worker thread. `changed` collects
    the files whose ctime is after its instant (`changed_since.py`)."""
    hashing = FileHashing(cache, time.time_ns(), listing.excluded, changed=changed)
    for batch in listing.batches:
        hashing.add_batch(batch)
    return RootScan(
        root=listing.root,
        tree=immutables.Map(hashing.dirs),
        total=hashing.total,
        count=hashing.count,
        directories=frozenset(listing.directories),
        plain=immutables.Map(listing.plain),
        name_watches={d: frozenset(n) for d, n in listing.name_watches.items()},
        unreadable=tuple(listing.unreadable + hashing.unreadable),
        missing=tuple(listing.missing),
        by_stat=tuple(hashing.by_stat),
        not_walked=tuple(listing.not_walked),
        link_targets=frozenset(listing.link_targets),
        files_read=hashing.files_read,
    )


class ContentScanner:
    """Walks the watch roots and keeps, per root, the last scan: the content as last
    seen and the stat cache of the next walk in one."""

    def __init__(self, roots: Iterable[WatchRoot], noise: NoiseFilter) -> None:
        self.roots = tuple(roots)
        self._noise = noise
        self._scans: dict[WatchRoot, RootScan] = {}
        # Exact paths left out of the digest (files Envoy itself writes, review #15).
        self.excluded: frozenset[str] = frozenset()

    @property
    def noise(self) -> NoiseFilter:
        return self._noise

    def scan(
        self, on_directory: DirectoryCallback | None = None, changed: ChangedSince | None = None
    ) -> Snapshot:
        """Walk and hash every root now."""
        return self.keep(self.scan_roots(on_directory, changed))

    def scan_roots(
        self, on_directory: DirectoryCallback | None = None, changed: ChangedSince | None = None
    ) -> list[RootScan]:
        """Walk and hash every root now; the scans, not kept."""
        listings = self.list_roots(on_directory or _no_watch, changed=changed)
        return [hash_listing(lst, self.cached(lst.root), changed) for lst in listings]

    def cached(self, root: WatchRoot) -> RootScan | None:
        return self._scans.get(root)

    def keep(self, scans: Iterable[RootScan]) -> Snapshot:
        """Remember these scans (a root's newest replaces its older one) and return the
        snapshot of every root as last scanned."""
        return self.snapshot(self.remember(scans))

    def remember(self, scans: Iterable[RootScan]) -> int:
        """`keep` without making the snapshot (for a caller that makes it next); how
        many files these scans read."""
        files_read = 0
        for scan in scans:
            self._scans[scan.root] = scan
            files_read += scan.files_read
        return files_read

    def snapshot(self, files_read: int = 0) -> Snapshot:
        for root in self.roots:
            if root not in self._scans:
                self._scans[root] = RootScan(root)
        for stale in self._scans.keys() - set(self.roots):
            del self._scans[stale]
        return Snapshot.of(tuple(self._scans[r] for r in self.roots), files_read=files_read)

    def list_roots(
        self,
        on_directory: DirectoryCallback,
        roots: Iterable[WatchRoot] | None = None,
        changed: ChangedSince | None = None,
    ) -> list[Listing]:
        """Phase one: watch and list every directory of these roots (all by default);
        `changed` notes what changed before each watch (`changed_since.py`)."""
        listings = []
        for root in self.roots if roots is None else roots:
            listing = Listing(root, on_directory, self.excluded, changed=changed)
            self._list_root(listing)
            listings.append(listing)
        return listings

    def _watch_chain(self, path: Path, listing: Listing) -> Path:
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
                known = listing.name_watches.setdefault(directory, set())
                if name not in known:
                    known.add(name)
                    added = True
                    listing.on_directory(directory, frozenset(known))
                    if listing.changed is not None:
                        listing.changed.note_hop(directory, name)
            if not added:
                break
        if real != path:
            listing.link_targets.add(str(real))
        return real

    def _list_root(self, listing: Listing) -> None:
        root = listing.root
        real = self._watch_chain(root.path, listing)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            listing.missing.append(str(root.path))
            return
        except OSError as err:  # permission, a symlink loop (ELOOP), ENOTDIR races
            listing.unreadable.append(f"{root.path} ({err.strerror})")
            return
        if stat.S_ISDIR(st.st_mode):
            self.walk_tree(WalkDirectory(str(root.path), real, st, False, None), listing)
        elif stat.S_ISREG(st.st_mode):
            display_dir, name = split_display(str(root.path))
            batch = Batch(display_dir, str(real.parent), [name], False, [real.name])
            listing.batches.append(batch)

    def walk_tree(self, top: WalkDirectory, listing: Listing) -> None:
        """Depth-first, in name order, on an explicit stack: no recursion limit."""
        stack = [top]
        while stack:
            subdirectories = self._list_directory(stack.pop(), listing)
            stack.extend(reversed(subdirectories))

    def _list_directory(self, directory: WalkDirectory, listing: Listing) -> list[WalkDirectory]:
        """Watch, then list one directory; return its subdirectories."""
        key = (directory.st.st_dev, directory.st.st_ino)
        if key in listing.visited:
            return []
        listing.visited.add(key)
        if directory.budget is not None and directory.budget.exhausted:
            return []
        listing.on_directory(directory.real, None)
        if listing.changed is not None:
            listing.changed.note_watched(str(directory.real), follow=True)
        try:
            entries = sorted(os.scandir(directory.real), key=operator.attrgetter("name"))
        except FileNotFoundError:
            return []
        except OSError:
            listing.unreadable.append(directory.display)
            return []
        listing.directories.add(directory.real)
        if directory.budget is None and not directory.hidden:
            listing.plain[str(directory.real)] = directory.display
        batch = Batch(directory.display, str(directory.real), [], True)
        if directory.budget is None:
            subdirectories = self._visit_entries(directory, entries, listing, batch)
        else:
            subdirectories = self._visit_budgeted(directory, entries, listing, batch)
        if batch.names:
            listing.batches.append(batch)
        return subdirectories

    def _visit_entries(
        self,
        directory: WalkDirectory,
        entries: list[os.DirEntry[str]],
        listing: Listing,
        batch: Batch,
    ) -> list[WalkDirectory]:
        """The walk's inner loop, run once per file of the tree: a comprehension keeps
        the regular files (by the entry's type, no stat) that are neither noise nor
        kubelet's `..` names; only the rest goes through `_visit_entry`. A 100,000-file
        walk took 130 ms with a call per entry, about 60 ms like this (issue 16: epoch 0
        waits for the walk)."""
        skip = self._noise.skips_file
        files = [
            name
            for entry in entries
            if entry.is_file(follow_symlinks=False) and skip(name := entry.name) is None
        ]
        if not directory.hidden:
            batch.names.extend(files)
        subdirectories: list[WalkDirectory] = []
        if len(files) == len(entries):
            return subdirectories
        noise = self._noise.match
        for entry in entries:
            if entry.is_file(follow_symlinks=False) or noise(entry.name) is not None:
                continue
            child = self._visit_entry(directory, entry, listing, batch)
            if child is not None:
                subdirectories.append(child)
        return subdirectories

    def _visit_budgeted(
        self,
        directory: WalkDirectory,
        entries: list[os.DirEntry[str]],
        listing: Listing,
        batch: Batch,
    ) -> list[WalkDirectory]:
        """Under a symlinked directory: every entry counts against the link's budget."""
        assert directory.budget is not None
        subdirectories: list[WalkDirectory] = []
        for entry in entries:
            if self._noise.is_noise(entry.name):
                continue
            if not directory.budget.take(listing):
                break
            child = self._visit_entry(directory, entry, listing, batch)
            if child is not None:
                subdirectories.append(child)
        return subdirectories

    def _visit_entry(
        self, parent: WalkDirectory, entry: os.DirEntry[str], listing: Listing, batch: Batch
    ) -> WalkDirectory | None:
        """Note a file entry for hashing; return a directory entry for the walk to visit.
        A regular file is known by the directory entry's type, without a stat."""
        hidden = parent.hidden or entry.name.startswith("..")
        is_link = entry.is_symlink()
        if not is_link and entry.is_file(follow_symlinks=False):
            if not hidden:
                batch.names.append(entry.name)
            return None
        if is_link and not hidden:
            # A link out of the tree (certbot's live/ -> archive/): watch where it
            # leads, or a renewal there would never be seen. Dangling ones too: the
            # chain ends at the deepest existing ancestor of the missing target.
            self._watch_chain(Path(entry.path), listing)
        try:
            st = os.stat(entry.path)
        except FileNotFoundError:
            return None  # vanished, or a dangling symlink
        except OSError as err:  # permission, a symlink loop (ELOOP)
            listing.unreadable.append(f"{parent.display}/{entry.name} ({err.strerror})")
            return None
        if stat.S_ISDIR(st.st_mode):
            return self._subdirectory(parent, entry, st, listing, is_link=is_link, hidden=hidden)
        if stat.S_ISREG(st.st_mode) and not hidden:
            batch.names.append(entry.name)
        return None

    def _subdirectory(
        self,
        parent: WalkDirectory,
        entry: os.DirEntry[str],
        st: os.stat_result,
        listing: Listing,
        *,
        is_link: bool,
        hidden: bool,
    ) -> WalkDirectory | None:
        display = f"{parent.display}/{entry.name}"
        if not is_link:  # the parent's path is real already: no realpath (O(depth))
            return WalkDirectory(display, parent.real / entry.name, st, hidden, parent.budget)
        real = Path(os.path.realpath(entry.path))
        if (st.st_dev, st.st_ino) in listing.visited:
            return None  # a link back into what was walked already
        if parent.real.is_relative_to(real):
            listing.not_walked.append(f"{display} (a symlink to {real}, which contains it)")
            return None
        budget = parent.budget or _Budget(display)
        return WalkDirectory(display, real, st, hidden, budget)


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
