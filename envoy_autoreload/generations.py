"""Config generations: every config that passes the gate, kept as an immutable snapshot.

Why snapshots: the `--config` file can change again between validation and the moment
Envoy reads it. Envoy is therefore started from a read-only copy of exactly the bytes
that passed the gate, named by their sha256, so what starts is byte for byte what was
validated. The copy keeps the config's suffix because Envoy picks its parser by
extension (`.yaml`, `.json`, `.pb`...).

Why history: each generation's fate (validated, on probation, good, failed, superseded) decides
what to roll back to when a new one fails its health probation: the newest GOOD one.
It is kept in `history.json` beside the snapshots so that a daemon restart neither
forgets the last good config nor retries one that already failed.

Only the bootstrap file itself is snapshotted. Files it names (certificates, Lua
scripts, SDS and CDS paths) are read by Envoy from where they are, so a rollback
restores the bootstrap but not a changed certificate or script.

One daemon per state directory: a `flock` on `state_dir/lock` is held for the life of
the store, so two daemons never interleave writes to the same history.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import fcntl
import hashlib
import json
import math
import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from envoy_autoreload.signal_mask import signals_blocked

_HISTORY = "history.json"
_LOCK = "lock"
_SNAPSHOTS = "generations"
_VERSION = 1
_TMP_PREFIX = "."
_TMP_SUFFIX = ".tmp"
_MIN_PREFIX = 4
_HEX = frozenset("0123456789abcdef")
# Stamps never go backwards (see GenerationStore._now); this is the step.
_TICK = 1e-6
# `close` waits this long, at most, for snapshots' early write-backs still running.
WRITE_BACK_WAIT_S = 5.0


class Outcome(enum.Enum):
    """What became of a generation, newest fact wins."""

    VALIDATED = "validated"  # passed the gate; not started yet
    PROBATION = "probation"  # LIVE, within its health window
    GOOD = "good"  # passed probation (or served with no window)
    FAILED = "failed"  # failed probation: not tried again until the bytes change
    SUPERSEDED = "superseded"  # a newer generation went LIVE before its window ended


@dataclass(frozen=True, slots=True)
class ConfigGeneration:
    sha256: str
    path: Path  # the read-only snapshot, named by sha256 with the config's suffix

    @property
    def short(self) -> str:
        return self.sha256[:12]


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    sha256: str
    created_at: float  # wall clock (time.time()) of the first snapshot of these bytes
    updated_at: float  # wall clock of the last change of outcome
    outcome: Outcome
    epoch: int | None  # the last epoch that started it
    detail: str | None  # why it failed, what it was rolled back to or from

    @property
    def short(self) -> str:
        return self.sha256[:12]


class StateDirError(Exception):
    """The state directory cannot be used; the message is one line for the operator."""


def _is_sha(text: str) -> bool:
    return len(text) == 64 and all(c in _HEX for c in text)


def _reason(err: OSError) -> str:
    """strerror reads as a sentence; repr(err) reads as a traceback."""
    return err.strerror or str(err)


def _fsync_dir(path: Path) -> None:
    """A rename is durable only once the directory entry itself is on disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, mode: int, *, durable: bool = True) -> None:
    """Readers (Envoy, a restarted daemon) see the old file or the whole new one, never
    half. Not `durable`: on disk only once `_fsync_file` and `_fsync_dir` ran."""
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=_TMP_PREFIX + path.name + ".", suffix=_TMP_SUFFIX
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # pruned meanwhile
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_back_early(path: Path) -> threading.Thread:
    """Start putting a snapshot's bytes on disk now, on a thread of its own.

    `sync` still makes them durable on the loop, in order with the history that names
    them. But by then (after the spawn, or when probation passes) this fsync has long
    finished, and that one finds nothing to write: a 5 MB config's fsync took 35-60 ms
    of loop time on a slow VM (issue 16, goal 5). The thread touches no state; an error
    is left for `sync` to meet and report. `GenerationStore.close` waits for it."""

    def write_back() -> None:
        with contextlib.suppress(OSError):
            _fsync_file(path)

    thread = threading.Thread(target=write_back, name="snapshot-fsync", daemon=True)
    with signals_blocked():
        thread.start()
    return thread


def _is_stray_tmp(name: str) -> bool:
    return name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX)


def _make_dir(path: Path, what: str) -> None:
    """Created 0750: snapshots may hold secrets the config inlines."""
    try:
        if path.exists() and not path.is_dir():
            raise StateDirError(f"{what} {path}: exists and is not a directory")
        if not path.is_dir():
            path.mkdir(mode=0o750, parents=True, exist_ok=True)
            os.chmod(path, 0o750)  # mkdir's mode is filtered through the umask
    except OSError as err:
        raise StateDirError(f"{what} {path}: cannot create: {_reason(err)}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise StateDirError(f"{what} {path}: not writable")


def _take_lock(state_dir: Path) -> int:
    """A second daemon on one state dir would interleave history writes: refuse it."""
    path = state_dir / _LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as err:
        raise StateDirError(
            f"state directory {state_dir}: cannot open {path}: {_reason(err)}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = _read_pid(fd)
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StateDirError(
                f"state directory {state_dir}: in use by another "
                f"envoy-autoreload (PID {holder} holds {path})"
            ) from None
        raise StateDirError(
            f"state directory {state_dir}: cannot lock {path}: {_reason(err)}"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as err:
        os.close(fd)
        raise StateDirError(
            f"state directory {state_dir}: cannot write {path}: {_reason(err)}"
        ) from None
    return fd


def _read_pid(fd: int) -> str:
    """The holder writes its PID just after locking; it may not be there yet."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _stamp(raw: dict[str, Any], key: str) -> float:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"bad {key} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"bad {key} {value!r}")
    return float(value)


def _entry_from_json(raw: Any) -> HistoryEntry:
    """Strict: a history we half understand is worse than none (it steers rollback)."""
    if not isinstance(raw, dict):
        raise ValueError("an entry is not an object")
    sha, outcome = raw.get("sha256"), raw.get("outcome")
    epoch, detail = raw.get("epoch"), raw.get("detail")
    if not isinstance(sha, str) or not _is_sha(sha):
        raise ValueError(f"bad sha256 {sha!r}")
    if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
        raise ValueError(f"bad epoch for {sha[:12]}")
    if detail is not None and not isinstance(detail, str):
        raise ValueError(f"bad detail for {sha[:12]}")
    created, updated = _stamp(raw, "created_at"), _stamp(raw, "updated_at")
    return HistoryEntry(sha, created, updated, Outcome(outcome), epoch, detail)


def _entry_to_json(entry: HistoryEntry) -> dict[str, Any]:
    return {
        "sha256": entry.sha256,
        "created_at": entry.created_at,
        "updated_at": entry.updated_at,
        "outcome": entry.outcome.value,
        "epoch": entry.epoch,
        "detail": entry.detail,
    }


def _parse_history(text: str) -> dict[str, HistoryEntry]:
    doc = json.loads(text)
    if not isinstance(doc, dict) or doc.get("version") != _VERSION:
        raise ValueError(f"not a version {_VERSION} history")
    raw = doc.get("generations")
    if not isinstance(raw, list):
        raise ValueError("no generations list")
    entries = [_entry_from_json(item) for item in raw]
    return {e.sha256: e for e in entries}


def _newest_first(entry: HistoryEntry) -> tuple[float, float]:
    return (-entry.updated_at, -entry.created_at)


class GenerationStore:
    """Snapshots plus history in one locked state directory; single-threaded use."""

    def __init__(self, state_dir: Path, lock_fd: int, keep: int, suffix: str) -> None:
        self.state_dir = state_dir
        self.snapshot_dir = state_dir / _SNAPSHOTS
        self.keep = keep
        self.suffix = suffix
        # One-line notes for the caller to log (history set aside, snapshot rewritten).
        self.warnings: list[str] = []
        self._lock_fd: int | None = lock_fd
        self._entries: dict[str, HistoryEntry] = {}
        self._stamp = 0.0
        # Written but not yet fsynced (`sync()`): a restart's critical path spent four
        # fsyncs (~3 ms here) on a snapshot Envoy reads from the page cache anyway.
        self._unsynced: set[Path] = set()
        self._write_backs: list[threading.Thread] = []  # `_write_back_early`'s, running
        self._history_unsaved = False

    @classmethod
    def open(cls, state_dir: Path, *, keep: int, suffix: str) -> GenerationStore:
        if "/" in suffix or "\0" in suffix:
            raise ValueError(f"config suffix {suffix!r} is not a file name suffix")
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        state_dir = state_dir.absolute()  # Envoy is started with the snapshot's path
        _make_dir(state_dir, "state directory")
        fd = _take_lock(state_dir)
        store = cls(state_dir, fd, keep, suffix)
        try:
            _make_dir(store.snapshot_dir, "snapshot directory")
            store._load()
        except BaseException:
            store.close()
            raise
        return store

    def __enter__(self) -> GenerationStore:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- history file ----------------------------------------------------------------

    def _load(self) -> None:
        path = self.state_dir / _HISTORY
        try:
            self._entries = _parse_history(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError, ValueError) as err:
            reason = _reason(err) if isinstance(err, OSError) else str(err).splitlines()[0]
            self._set_aside(path, reason)
            return
        for entry in self._entries.values():
            self._stamp = max(self._stamp, entry.created_at, entry.updated_at)

    def _set_aside(self, path: Path, reason: str) -> None:
        """Losing history costs a rollback target; refusing to start costs the proxy."""
        aside = path.with_name(_HISTORY + ".corrupt")
        try:
            os.replace(path, aside)
        except OSError as err:
            raise StateDirError(
                f"state directory {self.state_dir}: {path} is unreadable "
                f"({reason}) and cannot be set aside: {_reason(err)}"
            ) from None
        self._entries = {}
        self.warnings.append(
            f"generation history {path} unreadable ({reason}); "
            f"moved to {aside}, starting with an empty history"
        )

    def sync(self) -> None:
        """Make what `snapshot()` wrote durable, and the history that names it."""
        if self._history_unsaved:
            self._persist()
        else:
            self._sync_snapshots()

    def _sync_snapshots(self) -> None:
        if not self._unsynced:
            return
        for path in sorted(self._unsynced):
            _fsync_file(path)
        _fsync_dir(self.snapshot_dir)
        self._unsynced.clear()

    def _persist(self) -> None:
        """History never names a snapshot whose bytes are not on disk yet."""
        self._sync_snapshots()
        self._history_unsaved = False
        entries = sorted(self._entries.values(), key=_newest_first)
        doc = {"version": _VERSION, "generations": [_entry_to_json(e) for e in entries]}
        data = (json.dumps(doc, indent=1) + "\n").encode()
        _atomic_write(self.state_dir / _HISTORY, data, 0o640)

    def _now(self) -> float:
        """Wall clock, but never behind the newest stamp: order decides the rollback
        target, and a clock stepped back must not make an older GOOD look newer."""
        self._stamp = max(time.time(), self._stamp + _TICK)
        return self._stamp

    # -- snapshots ---------------------------------------------------------------------

    def _path(self, sha256: str) -> Path:
        return self.snapshot_dir / f"{sha256}{self.suffix}"

    def _intact(self, path: Path, data: bytes) -> bool:
        """Reuse only what is provably the validated bytes, read-only as written."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != len(data):
            return False
        if stat.S_IMODE(st.st_mode) != 0o444:
            return False
        return path.read_bytes() == data

    def snapshot(self, data: bytes, *, record: bool = True) -> ConfigGeneration:
        """The bytes' snapshot file, and their history entry unless `record` is False:
        a check started ahead of its burst (`check_ahead.py`) writes the file only, so
        that a burst which moves on leaves no entry, and `prune` removes the file."""
        sha = hashlib.sha256(data).hexdigest()
        path = self._path(sha)
        if not self._intact(path, data):
            if path.exists() or path.is_symlink():
                self.warnings.append(f"snapshot {path} did not hold its bytes; rewritten")
            _atomic_write(path, data, 0o444, durable=False)
            self._unsynced.add(path)
            self._write_backs = [t for t in self._write_backs if t.is_alive()]
            self._write_backs.append(_write_back_early(path))
        if record and sha not in self._entries:
            now = self._now()
            self._entries[sha] = HistoryEntry(sha, now, now, Outcome.VALIDATED, None, None)
            self._history_unsaved = True
        return ConfigGeneration(sha, path)

    def get(self, sha256: str) -> ConfigGeneration | None:
        if not _is_sha(sha256):
            return None
        path = self._path(sha256)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return None
        except OSError:
            return None
        return ConfigGeneration(sha256, path)

    def find(self, prefix: str) -> ConfigGeneration:
        wanted = prefix.strip().lower()
        if len(wanted) < _MIN_PREFIX or not all(c in _HEX for c in wanted):
            raise LookupError(
                f"generation {prefix!r}: give at least {_MIN_PREFIX} hex characters of its sha256"
            )
        found = [
            g for sha in self._entries if sha.startswith(wanted) if (g := self.get(sha)) is not None
        ]
        if not found:
            raise LookupError(f"generation {prefix!r}: no kept generation matches")
        if len(found) > 1:
            shorts = ", ".join(sorted(g.short for g in found))
            raise LookupError(f"generation {prefix!r} is ambiguous: {shorts}")
        return found[0]

    # -- history -----------------------------------------------------------------------

    def record(
        self,
        gen: ConfigGeneration,
        outcome: Outcome,
        *,
        epoch: int | None = None,
        detail: str | None = None,
    ) -> None:
        """Memory is updated even if persisting fails: the running daemon acts on the
        newest fact, and the next successful write carries it to disk."""
        now = self._now()
        old = self._entries.get(gen.sha256)
        if old is None:
            entry = HistoryEntry(gen.sha256, now, now, outcome, epoch, detail)
        else:
            kept_epoch = old.epoch if epoch is None else epoch
            entry = dataclasses.replace(
                old, updated_at=now, outcome=outcome, epoch=kept_epoch, detail=detail
            )
        self._entries[gen.sha256] = entry
        self._persist()

    def outcome(self, sha256: str) -> Outcome | None:
        entry = self._entries.get(sha256)
        return None if entry is None else entry.outcome

    def last_good(self) -> ConfigGeneration | None:
        for entry in self.history():
            if entry.outcome is Outcome.GOOD and (gen := self.get(entry.sha256)):
                return gen
        return None

    def history(self) -> list[HistoryEntry]:
        return sorted(self._entries.values(), key=_newest_first)

    def prune(self, pinned: set[str]) -> None:
        """History and disk stay bounded; what the caller may still start never goes."""
        good = self.last_good()
        protected = set(pinned) | ({good.sha256} if good else set())
        dropped = [e.sha256 for e in self.history()[self.keep :] if e.sha256 not in protected]
        for sha in dropped:
            del self._entries[sha]
        if dropped:
            self._persist()  # before unlinking: history never names a removed snapshot
        self._remove_files(protected)

    def _remove_files(self, protected: set[str]) -> None:
        """Dropped snapshots, orphans (history set aside, old suffix) and crash leftovers.

        Best effort over every file; the first error is raised once all were tried."""
        first: OSError | None = None
        victims = [self.state_dir / n for n in os.listdir(self.state_dir) if _is_stray_tmp(n)]
        for name in os.listdir(self.snapshot_dir):
            sha, rest = name[:64], name[64:]
            ours = _is_sha(sha) and (rest == "" or rest.startswith("."))
            if _is_stray_tmp(name) or (ours and sha not in self._entries.keys() | protected):
                victims.append(self.snapshot_dir / name)
        for path in victims:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as err:
                first = first or err
        if first is not None:
            raise first

    def close(self) -> None:
        """Synced, the early write-backs waited for (a bounded wait: an fsync stuck on a
        dead disk must not hold the daemon's exit), the lock released."""
        with contextlib.suppress(OSError):
            self.sync()
        deadline = time.monotonic() + WRITE_BACK_WAIT_S
        for thread in self._write_backs:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._write_backs = []
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the flock
