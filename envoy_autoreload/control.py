"""The control socket: a unix stream socket (mode 0600) in the event loop, one JSON line per
request and per reply. It exists so that a reload can be *truthful*: `kill -HUP` (and
`nginx -s reload`) answer 0 even when the reload failed, while `reload` here answers
once it is over, with the new serving epoch or the reason it did not happen.

Requests: `reload`, `reload --force` (restart even when the content is unchanged),
`status`. Replies: {"ok": bool, "message": str, "epoch": int|null, "status": {...}}.
Only the socket's owner (and root) can connect: the file mode is the access control.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from envoy_autoreload.errors import UsageError
from envoy_autoreload.ports import Reactor

MAX_REQUEST_BYTES: Final = 4096
IDLE_TIMEOUT_S: Final = 5.0


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
        body: dict[str, object] = {"ok": self.ok, "message": self.message, "epoch": self.epoch}
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
        """Answer and close, never blocking the loop: a reply is far smaller than the
        socket buffer, and a client that does not read or went away is dropped."""
        with contextlib.suppress(OSError):
            self.sock.setblocking(False)
            self.sock.send(reply.encode())
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class ControlServer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._prepare_directory()
        self._remove_stale_socket()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_umask = os.umask(0o177)  # created 0600: no window where others may connect
            try:
                self._sock.bind(str(path))
            finally:
                os.umask(old_umask)
            self._sock.listen(16)
        except OSError as err:
            self._sock.close()
            raise UsageError(f"cannot create control socket {path}: {err.strerror}") from err
        self._sock.setblocking(False)

    def _prepare_directory(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(
                f"cannot create {self.path.parent} for the control socket: {err.strerror} "
                "(give --control-socket PATH)"
            ) from err

    def _remove_stale_socket(self) -> None:
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise UsageError(f"control socket path {self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink(missing_ok=True)  # left by a daemon that died
            return
        finally:
            probe.close()
        raise UsageError(f"another envoy-autoreload answers on {self.path}")

    def fileno(self) -> int:
        return self._sock.fileno()

    def accept(self) -> ControlConnection | None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        conn.setblocking(False)
        return ControlConnection(conn)

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


class ControlDesk:
    """Who waits for what: clients that have not sent their request yet (dropped after
    IDLE_TIMEOUT_S, so a silent client cannot hold an fd for ever), and `reload` clients
    by request number, answered by the first outcome that covers that number."""

    def __init__(self, reactor: Reactor, idle_deadline_key: Hashable) -> None:
        self._reactor = reactor
        self._idle_key = idle_deadline_key
        self._idle: list[ControlConnection] = []
        self._waiting: list[tuple[int, ControlConnection]] = []

    def accept_all(self, server: ControlServer) -> None:
        while (conn := server.accept()) is not None:
            self._reactor.add_reader(conn.fileno(), conn)
            self._idle.append(conn)
        if self._idle and not self._reactor.has_deadline(self._idle_key):
            self._reactor.set_timeout(self._idle_key, IDLE_TIMEOUT_S)

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
        now = time.monotonic()
        for conn in [c for c in self._idle if now - c.opened_at >= IDLE_TIMEOUT_S]:
            self._idle.remove(conn)
            self._reactor.remove_reader(conn.fileno())
            conn.close()
        if self._idle:
            oldest = min(c.opened_at for c in self._idle)
            self._reactor.set_deadline(self._idle_key, oldest + IDLE_TIMEOUT_S)

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
