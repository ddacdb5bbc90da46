"""Linux inotify through `inotify_simple`: one instance, its fd in the daemon's selector.

The only module that imports inotify_simple (it ships no type information). Watches are
on directories, never on the files themselves: an editor's atomic save or a ConfigMap
`..data` swap replaces the inode a file watch would follow (inotify(7): watches follow
inodes, not paths). Which directories to watch comes from `ContentScanner`'s walk; this
module adds a watch for a new subdirectory the moment it appears, so a push that creates
a directory and fills it keeps extending the same burst.

What counts as an event: IN_CLOSE_WRITE (a write is seen once, when the file is
closed, not at every write(2)), renames in and out, deletions, attribute changes (the
digest then says "unchanged"), and IN_CREATE only for directories and symlinks: a
regular file's creation is followed by its IN_CLOSE_WRITE, and reacting to the creation
would read a half-written file. IN_Q_OVERFLOW means events were lost: report it, and
the settle rescans everything anyway.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import Final

import inotify_simple

from envoy_autoreload.limits import instance_limit_error, watch_limit_message
from envoy_autoreload.watch import directories_under
from envoy_autoreload.watch.filters import NoiseFilter

OVERFLOW: Final = "<inotify queue overflow>"
# One read of the queue per turn of the loop: about 500 events of a typical name (two per
# file written), a few milliseconds of Python on a slow 2-vCPU VM (issue 16, goal 5).
# The kernel returns whole events, and one is at most 16 + NAME_MAX + 1 bytes.
READ_BYTES: Final = 16 * 1024

_F = inotify_simple.flags
WATCH_MASK: Final[int] = int(
    _F.CLOSE_WRITE
    | _F.MOVED_FROM
    | _F.MOVED_TO
    | _F.CREATE
    | _F.DELETE
    | _F.DELETE_SELF
    | _F.MOVE_SELF
    | _F.ATTRIB
    | _F.ONLYDIR
)
_IN_ISDIR: Final[int] = int(_F.ISDIR)
_IN_CREATE: Final[int] = int(_F.CREATE)
_IN_MOVED_TO: Final[int] = int(_F.MOVED_TO)
_IN_MOVED_FROM: Final[int] = int(_F.MOVED_FROM)
_IN_IGNORED: Final[int] = int(_F.IGNORED)
_IN_Q_OVERFLOW: Final[int] = int(_F.Q_OVERFLOW)
_SELF_EVENTS: Final[int] = int(_F.DELETE_SELF | _F.MOVE_SELF)


class InotifyWatcher:
    """Directory watches on one inotify instance; reports changed paths."""

    drains_synchronously = True

    def __init__(self, noise: NoiseFilter) -> None:
        self._noise = noise
        try:
            self._inotify = inotify_simple.INotify(nonblocking=True)
        except OSError as err:
            if err.errno == errno.EMFILE:
                raise instance_limit_error(err) from err
            raise
        self._by_wd: dict[int, tuple[Path, frozenset[str] | None]] = {}
        self._by_path: dict[Path, int] = {}
        self._unwatched: list[Path] = []
        self._limit_message = ""
        self._unwatchable: list[tuple[Path, str]] = []

    def take_unwatched(self) -> tuple[list[Path], str]:
        """Directories that could not be watched since the last call, and why."""
        unwatched, self._unwatched = self._unwatched, []
        return unwatched, self._limit_message

    def take_unwatchable(self) -> list[tuple[Path, str]]:
        """Directories the kernel refused for another reason since the last call."""
        unwatchable, self._unwatchable = self._unwatchable, []
        return unwatchable

    def fileno(self) -> int:
        return int(self._inotify.fileno())

    @property
    def watch_count(self) -> int:
        return len(self._by_wd)

    def watch_directory(self, path: Path, names: frozenset[str] | None) -> None:
        """Watch `path`: every entry (names None) or only the given names.

        Always asks the kernel: a directory replaced by a rename keeps its path but is
        a new inode, and the old watch follows the old inode away (inotify(7)). The
        kernel answers with the existing wd when the inode is the same one.

        No errno escapes: this runs inside the daemon's loop, where an exception stops
        every Envoy (review #13). ENOSPC is the watch limit (the caller decides whether
        a partial watch will do); anything else that inotify_add_watch(2) can say
        (ENAMETOOLONG for a path over PATH_MAX, ELOOP, ENOMEM) makes the directory
        unwatchable, for `take_unwatchable` to report.
        """
        try:
            wd = int(self._inotify.add_watch(str(path), WATCH_MASK))
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                return  # gone since the walk saw it; the walk watches its nearest ancestor
            if err.errno == errno.ENOSPC:
                # Keep walking: the caller decides whether a partial watch is acceptable.
                self._unwatched.append(path)
                self._limit_message = watch_limit_message(path, self.watch_count)
                return
            if err.errno == errno.EACCES:
                return  # the walk reports unreadable paths
            self._unwatchable.append((path, err.strerror or str(err)))
            return
        old_wd = self._by_path.get(path)
        if old_wd is not None and old_wd != wd:
            self._drop_watch(old_wd)  # the old inode moved away: stop following it
        previous = self._by_wd.get(wd)
        if previous is not None and previous[0] == path:
            current = previous[1]
            names = None if current is None or names is None else current | names
        elif previous is not None:
            # Same inode reached by another path (a bind mount or a moved directory).
            self._by_path.pop(previous[0], None)
        self._by_wd[wd] = (path, names)
        self._by_path[path] = wd

    def retire(self, keep: set[Path]) -> None:
        """Drop watches on directories the last walk no longer reached (moved away),
        name watches included: a renamed-away directory's watch follows its inode and
        would report the old place's events as ours (inotify(7))."""
        for path, wd in list(self._by_path.items()):
            if path not in keep:
                self._drop_watch(wd)

    def read_changes(self, *, drain: bool = True) -> set[str]:
        """Read pending events without blocking (all of them, or with `drain` False at
        most `READ_BYTES`: the rest keeps the fd readable for the loop's next turn, so
        a 10,000-file burst is not one long turn, issue 16); the paths that matter."""
        changed: set[str] = set()
        created: list[str] = []
        for event in self._read_events(drain):
            path = self._changed_path(event, created)
            if path is not None:
                changed.add(path)
        # A regular file's IN_CREATE counts only when it appeared whole. Asked after the
        # read: its IN_CLOSE_WRITE is nearly always in the same read, which spares an
        # lstat per new file of a burst (a third of the read's time, issue 16).
        changed.update(p for p in created if p not in changed and _appears_whole(p))
        return changed

    def _changed_path(self, event: inotify_simple.Event, created: list[str]) -> str | None:
        """The path one event says changed (None: nothing that matters); a regular
        file's creation goes to `created` instead, for the caller to decide."""
        mask = int(event.mask)
        if mask & _IN_Q_OVERFLOW:
            return OVERFLOW
        entry = self._by_wd.get(int(event.wd))
        if entry is None:
            return None
        directory, names = entry
        if mask & _IN_IGNORED:
            self._forget(int(event.wd))
            return None
        if mask & _SELF_EVENTS:
            return str(directory)
        name = str(event.name)
        if not name or self._noise.is_noise(name) or (names is not None and name not in names):
            return None
        parent = str(directory)  # strings: pathlib's cost per event adds up in a burst
        path = f"{parent}/{name}" if parent != "/" else f"/{name}"
        if mask & _IN_ISDIR:
            if mask & _IN_MOVED_FROM:
                self._drop_tree(Path(path))  # its watches would report the new place as here
            elif names is None and mask & (_IN_CREATE | _IN_MOVED_TO):
                self._watch_new_tree(Path(path))
        elif mask & _IN_CREATE:
            created.append(path)  # its IN_CLOSE_WRITE follows: never read a half-written file
            return None
        return path

    def _read_events(self, drain: bool) -> list[inotify_simple.Event]:
        chunks = []
        while True:
            try:
                data = os.read(self.fileno(), READ_BYTES)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
            if not drain:
                break
        return list(inotify_simple.parse_events(b"".join(chunks)))

    def _watch_new_tree(self, top: Path) -> None:
        for directory in directories_under(top, self._noise):
            self.watch_directory(directory, None)

    def _drop_watch(self, wd: int) -> None:
        self._forget(wd)
        with contextlib.suppress(OSError):  # already gone: IN_IGNORED is on its way
            self._inotify.rm_watch(wd)

    def _drop_tree(self, top: Path) -> None:
        for path, wd in list(self._by_path.items()):
            if path == top or path.is_relative_to(top):
                self._drop_watch(wd)

    def _forget(self, wd: int) -> None:
        entry = self._by_wd.pop(wd, None)
        if entry is not None and self._by_path.get(entry[0]) == wd:
            del self._by_path[entry[0]]

    def close(self) -> None:
        self._inotify.close()


def _appears_whole(path: str) -> bool:
    """A symlink, or a hard link to an existing file (link(2) after an O_TMPFILE write):
    entries that appear complete, with no IN_CLOSE_WRITE to follow."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISLNK(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink > 1)
