"""The control socket: a unix stream socket (mode 0600) in the event loop, one JSON line per
request and per reply. It exists so that a reload can be *truthful*: `kill -HUP` (and
`nginx -s reload`) answer 0 even when the reload failed, while `reload` here answers
once it is over, with the new serving epoch or the reason it did not happen.

Requests: `reload`, `reload --force` (restart even when the content is unchanged),
`status`. Replies: {"ok": bool, "message": str, "epoch": int|null, "status": {...}}.
Only the socket's owner (and root) can connect: the file mode is the access control.

Nobody else may put a socket where ours is expected either: the socket's directory
must be ours (or root's) and not writable by group or others, a socket that still
answers or refuses us (EACCES, a full backlog) is never taken over, and at exit only the
socket we bound is removed. `envoy-autoreloadctl` checks the other end's uid.

Nothing a client does reaches the loop's `finally` (which stops every Envoy): `accept()`
failures (EMFILE and the like) pause accepting for ACCEPT_BACKOFF_S, and beyond
MAX_CLIENTS idle or waiting clients a new one is told "busy" at once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from envoy_autoreload.errors import UsageError
from envoy_autoreload.logs import log_event

if TYPE_CHECKING:  # the loop and its reactor: not imported before epoch 0 (cli.py)
    from envoy_autoreload.ports import Reactor

MAX_REQUEST_BYTES: Final = 4096
IDLE_TIMEOUT_S: Final = 5.0
MAX_CLIENTS: Final = 64
ACCEPT_BACKOFF_S: Final = 1.0
MAX_MESSAGE_CHARS: Final = 4096
TRUNCATED: Final = " …(truncated, see the log)"
# accept() failures that concern only the connection being accepted: try the next one.
_CONNECTION_GONE: Final = frozenset({errno.ECONNABORTED, errno.EPROTO})

logger = logging.getLogger(__name__)


def default_control_socket() -> Path:
    """Under systemd's $RUNTIME_DIRECTORY when set (RuntimeDirectory=), else /run/...."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    base = Path(runtime) if runtime else Path("/run/envoy-autoreload")
    return base / "control.sock"


@dataclass(frozen=True, slots=True)
class ControlReply:
    ok: bool
    message: str
    epoch: int | None = None
    status: dict[str, object] | None = None

    def encode(self) -> bytes:
        """One JSON line. The message is capped at MAX_MESSAGE_CHARS: Envoy's error for a
        type error quotes the whole config, and a reply larger than the socket buffer
        would be cut by the one non-blocking send, leaving the client no answer at all."""
        message = self.message
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + TRUNCATED
        body: dict[str, object] = {"ok": self.ok, "message": message, "epoch": self.epoch}
        if self.status is not None:
            body["status"] = self.status
        return json.dumps(body).encode() + b"\n"


@dataclass(eq=False)
class ControlConnection:
    sock: socket.socket
    opened_at: float = field(default_factory=time.monotonic)
    buffer: bytearray = field(default_factory=bytearray)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_request(self) -> str | None:
        """The request line once complete; "" when the client went away without one."""
        try:
            chunk = self.sock.recv(MAX_REQUEST_BYTES)
        except BlockingIOError:
            return None
        except OSError:
            return ""
        if not chunk:
            return self.buffer.decode(errors="replace").strip()
        self.buffer.extend(chunk)
        if b"\n" in self.buffer or len(self.buffer) >= MAX_REQUEST_BYTES:
            return self.buffer.split(b"\n", 1)[0].decode(errors="replace").strip()
        return None

    def reply(self, reply: ControlReply) -> None:
        """Answer and close, never blocking the loop: a reply (its message capped) is far
        smaller than the socket buffer, and a client that does not read or went away is
        dropped."""
        with contextlib.suppress(OSError):
            self.sock.setblocking(False)
            self.sock.send(reply.encode())
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class ControlServer:
    """The listening socket. Every OSError of setting it up becomes one UsageError line:
    the caller decides whether the daemon runs on without it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._prepare_directory()
        self._remove_stale_socket()
        try:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as err:
            raise UsageError(f"cannot create control socket {path}: {_why(err)}") from err
        try:
            old_umask = os.umask(0o177)  # created 0600: no window where others may connect
            try:
                self._sock.bind(str(path))
            finally:
                os.umask(old_umask)
        except OSError as err:
            self._sock.close()
            raise UsageError(f"cannot create control socket {path}: {_why(err)}") from err
        try:
            self._sock.listen(16)
            bound = os.lstat(path)
        except OSError as err:
            self._sock.close()
            with contextlib.suppress(OSError):
                path.unlink()  # bound a moment ago: ours
            raise UsageError(f"cannot create control socket {path}: {_why(err)}") from err
        # What close() may remove: this socket file, not one another daemon put there since.
        self._identity = (bound.st_dev, bound.st_ino)
        self._sock.setblocking(False)

    @classmethod
    def inherited(cls, path: Path, fd: int) -> ControlServer:
        """The listening socket the previous image handed over (re-exec in place):
        clients queued in its backlog are served by this image, with no gap."""
        server = cls.__new__(cls)
        server.path = path
        server._sock = socket.socket(fileno=fd)
        server._sock.set_inheritable(False)
        server._sock.setblocking(False)
        bound = os.lstat(path)
        server._identity = (bound.st_dev, bound.st_ino)
        return server

    def _prepare_directory(self) -> None:
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = directory.stat()
        except OSError as err:
            raise UsageError(
                f"cannot create {directory} for the control socket: {_why(err)} "
                "(give --control-socket PATH)"
            ) from err
        _check_directory(directory, info)

    def _remove_stale_socket(self) -> None:
        """Remove a socket file left by a daemon that died, and nothing else: only
        ECONNREFUSED means nobody listens. EACCES (another user's daemon) or EAGAIN (a
        live daemon with a full backlog) mean someone lives there."""
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        except OSError as err:
            raise UsageError(f"cannot check control socket {self.path}: {_why(err)}") from err
        if not stat.S_ISSOCK(mode):
            raise UsageError(f"control socket path {self.path} exists and is not a socket")
        try:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as err:
            raise UsageError(f"cannot check control socket {self.path}: {_why(err)}") from err
        probe.setblocking(False)  # a full backlog answers EAGAIN instead of blocking
        try:
            probe.connect(str(self.path))
        except ConnectionRefusedError:
            self._unlink_stale()
            return
        except FileNotFoundError:
            return  # went away meanwhile
        except OSError as err:
            raise UsageError(
                f"control socket {self.path} is in use ({_why(err)}); not taking it over"
            ) from err
        finally:
            probe.close()
        raise UsageError(f"another envoy-autoreload answers on {self.path}")

    def _unlink_stale(self) -> None:
        try:
            self.path.unlink(missing_ok=True)  # left by a daemon that died
        except OSError as err:
            raise UsageError(
                f"cannot remove the stale control socket {self.path}: {_why(err)}"
            ) from err

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self) -> ControlConnection | None:
        """The next pending client, or None when there is none. Other OSErrors (EMFILE,
        ENFILE, ENOMEM, ECONNABORTED) are raised for ControlDesk to survive."""
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        conn.setblocking(False)
        return ControlConnection(conn)

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(OSError):
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._identity:
                self.path.unlink()


def _why(err: OSError) -> str:
    """strerror, or the message when there is none ("AF_UNIX path too long")."""
    return err.strerror or str(err)


def _check_directory(directory: Path, info: os.stat_result) -> None:
    """Whoever can write the socket's directory can replace the socket, and answer
    `envoy-autoreloadctl reload` in our name: require it to be ours (or root's) and
    writable by nobody else."""
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{directory} (for the control socket) is not a directory")
    if info.st_uid not in (os.geteuid(), 0):
        raise UsageError(
            f"control socket directory {directory} belongs to uid {info.st_uid}, not to "
            "us or root: whoever owns it could replace the socket (give --control-socket "
            "PATH in a directory of ours)"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UsageError(
            f"control socket directory {directory} is writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):o}): they could replace the socket "
            f"(chmod go-w {directory}, or give --control-socket PATH in a private directory)"
        )


class ControlDesk:
    """Who waits for what: clients that have not sent their request yet (dropped after
    IDLE_TIMEOUT_S, so a silent client cannot hold an fd for ever), and `reload` clients
    by request number, answered by the first outcome that covers that number.

    At most MAX_CLIENTS of both together. When `accept()` fails for want of resources,
    the listening socket is left unread for ACCEPT_BACKOFF_S (level-triggered, it would
    otherwise wake the loop at once, for ever); the idle deadline brings it back.
    """

    def __init__(self, reactor: Reactor, idle_deadline_key: Hashable) -> None:
        self._reactor = reactor
        self._idle_key = idle_deadline_key
        self._idle: list[ControlConnection] = []
        self._waiting: list[tuple[int, ControlConnection]] = []
        self._paused: tuple[ControlServer, float] | None = None  # (server, resume at)
        self._accept_failing = False  # logged once per run of failures

    def accept_all(self, server: ControlServer) -> None:
        while True:
            try:
                conn = server.accept()
            except OSError as err:
                if err.errno in _CONNECTION_GONE:
                    continue  # that client gave up; the next may be fine
                self._pause_accepting(server, err)
                break
            if conn is None:
                break
            self._accept_failing = False
            conn.opened_at = self._reactor.now()
            if len(self._idle) + len(self._waiting) >= MAX_CLIENTS:
                conn.reply(ControlReply(False, f"busy: {MAX_CLIENTS} clients wait; try again"))
                continue
            self._reactor.add_reader(conn.fileno(), conn)
            self._idle.append(conn)
        self._arm()

    def _pause_accepting(self, server: ControlServer, err: OSError) -> None:
        self._reactor.remove_reader(server.fileno())
        self._paused = (server, self._reactor.now() + ACCEPT_BACKOFF_S)
        log_event(
            logger,
            logging.DEBUG if self._accept_failing else logging.WARNING,
            "control.accept_failed",
            f"cannot accept a control client: {_why(err)}; trying again in {ACCEPT_BACKOFF_S:g} s",
            errno=errno.errorcode.get(err.errno or 0, str(err.errno)),
        )
        self._accept_failing = True

    def _arm(self) -> None:
        """One deadline for both: the oldest idle client's timeout, and resuming accept."""
        due = [c.opened_at + IDLE_TIMEOUT_S for c in self._idle]
        if self._paused is not None:
            due.append(self._paused[1])
        if due:
            self._reactor.set_deadline(self._idle_key, min(due))

    def read(self, conn: ControlConnection) -> str | None:
        """The client's request once complete (it is then no longer read from)."""
        request = conn.read_request()
        if request is None:
            return None
        self._reactor.remove_reader(conn.fileno())
        if conn in self._idle:
            self._idle.remove(conn)
        return request

    def drop_idle(self) -> None:
        now = self._reactor.now()
        for conn in [c for c in self._idle if now - c.opened_at >= IDLE_TIMEOUT_S]:
            self._idle.remove(conn)
            self._reactor.remove_reader(conn.fileno())
            conn.close()
        if self._paused is not None and now >= self._paused[1]:
            server, _ = self._paused
            self._paused = None
            self._reactor.add_reader(server.fileno(), server)
        self._arm()

    def wait(self, seq: int, conn: ControlConnection) -> None:
        self._waiting.append((seq, conn))

    def answer(self, up_to_seq: int, reply: ControlReply) -> None:
        """Answer every waiting client whose request this outcome covers."""
        if not up_to_seq:
            return
        keep: list[tuple[int, ControlConnection]] = []
        for seq, conn in self._waiting:
            if seq <= up_to_seq:
                conn.reply(reply)
            else:
                keep.append((seq, conn))
        self._waiting = keep
