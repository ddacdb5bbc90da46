"""The control socket at its edges: fd exhaustion, crowds of clients, replies larger than
the socket buffer, sockets and directories that are not ours, and a peer that is not
the daemon. Real unix sockets, real rlimits, real uids (through setpriv)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from envoy_autoreload.control import (
    ACCEPT_BACKOFF_S,
    MAX_CLIENTS,
    ControlConnection,
    ControlDesk,
    ControlReply,
    ControlServer,
)
from envoy_autoreload.errors import UsageError
from envoy_autoreload.loop import DeadlineReached, FdReady, Reactor
from tests.daemon import one_error_line, start_daemon

CTL = Path(sys.executable).parent / "envoy-autoreloadctl"
IDLE = "control-idle"
NO_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")

needs_setpriv = pytest.mark.skipif(
    shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs setpriv and root"
)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def desk(tmp_path: Path) -> Iterator[tuple[ControlServer, Reactor, ControlDesk]]:
    server = ControlServer(tmp_path / "c.sock")
    reactor = Reactor(signals=())
    reactor.add_reader(server.fileno(), server)
    yield server, reactor, ControlDesk(reactor, IDLE)
    reactor.close()
    server.close()


def _client(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.setblocking(False)
    return sock


@contextlib.contextmanager
def _no_free_fd() -> Iterator[None]:
    """The process's fd table full (EMFILE): the soft limit lowered just above the fds
    in use, and the gap filled."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    fillers: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 4, hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.dup(0))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_accept_failing_with_emfile_pauses_accepting_and_recovers(
    desk: tuple[ControlServer, Reactor, ControlDesk],
) -> None:
    server, reactor, front = desk
    capture = _Capture()
    control_logger = logging.getLogger("envoy_autoreload.control")
    control_logger.addHandler(capture)
    control_logger.setLevel(logging.DEBUG)
    client = _client(server.path)
    try:
        with _no_free_fd():
            front.accept_all(server)  # raised OSError(EMFILE) out of the loop before
            front.accept_all(server)
        events = reactor.poll()  # the listening socket is not watched for a while
        assert FdReady(server) not in events and DeadlineReached(IDLE) in events
        assert reactor.claim(DeadlineReached(IDLE))
        front.drop_idle()  # ACCEPT_BACKOFF_S is over: accept again
        assert FdReady(server) in reactor.poll()
        front.accept_all(server)
        client.sendall(b"status\n")
        assert _request_of(reactor, front) == "status"
    finally:
        control_logger.removeHandler(capture)
        control_logger.setLevel(logging.NOTSET)
        client.close()
    failed = [
        r for r in capture.records if getattr(r, "autoreload_event", "") == "control.accept_failed"
    ]
    assert [r.levelno for r in failed] == [logging.WARNING, logging.DEBUG], "logged once"
    assert "Too many open files" in failed[0].getMessage()
    assert f"{ACCEPT_BACKOFF_S:g} s" in failed[0].getMessage()


def _request_of(reactor: Reactor, front: ControlDesk) -> str:
    for event in reactor.poll():
        if isinstance(event, FdReady) and isinstance(event.key, ControlConnection):
            request = front.read(event.key)
            if request is not None:
                event.key.close()
                return request
    raise AssertionError("no request")


def test_clients_beyond_the_cap_are_told_busy(
    desk: tuple[ControlServer, Reactor, ControlDesk],
) -> None:
    server, reactor, front = desk
    extra = 6
    clients = []
    try:
        for _ in range(MAX_CLIENTS + extra):
            clients.append(_client(server.path))
            front.accept_all(server)  # as the loop does; the backlog is only 16
        replies = [_reply_now(c) for c in clients]
        busy = [r for r in replies if r is not None]
        assert len(busy) == extra and all(not r["ok"] and "busy" in str(r["message"]) for r in busy)
        assert replies[:MAX_CLIENTS] == [None] * MAX_CLIENTS, "the first ones still wait"
    finally:
        for client in clients:
            client.close()
    closed = 0
    while closed < MAX_CLIENTS:  # the desk's side sees each client go away
        for event in reactor.poll():
            if isinstance(event, FdReady) and isinstance(event.key, ControlConnection):
                assert front.read(event.key) == ""
                event.key.close()
                closed += 1


def _reply_now(sock: socket.socket) -> dict[str, object] | None:
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return None
    reply: dict[str, object] = json.loads(data)
    return reply


def _answer_once(server: ControlServer, message: str) -> threading.Thread:
    """A daemon stand-in: accept one client, read its request, answer `message`."""

    def serve() -> None:
        select.select([server], [], [], 60)
        conn = server.accept()
        assert conn is not None
        select.select([conn], [], [], 60)
        conn.read_request()
        conn.reply(ControlReply(False, message))

    thread = threading.Thread(target=serve, name="fake-daemon")
    thread.start()
    return thread


def test_a_reply_larger_than_the_socket_buffer_still_tells_the_reason(tmp_path: Path) -> None:
    server = ControlServer(tmp_path / "c.sock")
    reason = "validation failed: Unable to parse JSON as proto: {" + '"k": "v", ' * 200_000
    thread = _answer_once(server, reason)
    try:
        result = subprocess.run(
            [str(CTL), "--control-socket", str(server.path), "reload"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        thread.join(timeout=60)
        server.close()
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("envoy-autoreloadctl: reload failed: validation failed: Unable to")
    assert line.endswith("…(truncated, see the log)") and len(line) < 5000


def test_a_full_backlog_is_someone_alive_not_a_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    inode = path.stat().st_ino
    queued = []
    try:
        with contextlib.suppress(BlockingIOError):
            while True:  # fill the backlog; the listener never accepts
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                queued.append(sock)
                sock.setblocking(False)
                sock.connect(str(path))
        # In a child: before the fix its blocking probe waited for ever on the backlog.
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path\n"
                "from envoy_autoreload.control import ControlServer\n"
                "from envoy_autoreload.errors import UsageError\n"
                "try:\n    ControlServer(Path(sys.argv[1]))\n"
                "except UsageError as err:\n    sys.exit(str(err))\n",
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 1 and "not taking it over" in result.stderr
        assert path.stat().st_ino == inode, "the live socket was left alone"
    finally:
        for sock in queued:
            sock.close()
        listener.close()


def test_at_exit_only_our_own_socket_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    server = ControlServer(path)
    path.unlink()  # as a second daemon started after a stale-check would
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as successor:
        successor.bind(str(path))
        successor.listen(1)
        server.close()
        assert path.exists(), "the successor's socket is still there"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
    path.unlink()
    own = ControlServer(path)
    own.close()
    assert not path.exists(), "our own socket is removed"


def test_a_directory_others_can_write_or_own_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UsageError, match="writable by group or others") as info:
        ControlServer(shared / "c.sock")
    assert "\n" not in str(info.value) and not (shared / "c.sock").exists()
    shared.chmod(0o1777)  # sticky does not help: they could plant one before us
    with pytest.raises(UsageError, match="writable by group or others"):
        ControlServer(shared / "c.sock")
    if os.geteuid() != 0:
        return  # only root can give a directory away
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 12345, 12345)
    with pytest.raises(UsageError, match="belongs to uid 12345"):
        ControlServer(foreign / "c.sock")
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)  # systemd's RuntimeDirectory= default: fine
    ControlServer(mine / "c.sock").close()


def _script(tmp_path: Path) -> Path:
    script = tmp_path / "start.sh"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o755)
    return script


@needs_setpriv
def test_an_unsearchable_runtime_directory_is_a_warning_and_the_daemon_runs_on(
    tmp_path: Path,
) -> None:
    locked = tmp_path / "runtime"
    locked.mkdir(mode=0o700)
    locked.chmod(0)
    try:
        daemon = start_daemon(
            ["--admin-address", "127.0.0.1:1", str(_script(tmp_path))],
            tmp_path / "d.log",
            env={"RUNTIME_DIRECTORY": str(locked), "ENVOY_AUTORELOAD_CONTROL_SOCKET": ""},
            prefix=NO_DAC,  # root without CAP_DAC_OVERRIDE: permissions apply to it
        )
        try:
            warned = daemon.wait_event("control.unavailable")
            assert warned["level"] == "warning" and "Permission denied" in warned["message"]
            daemon.wait_event("child.started", epoch=0)
            assert daemon.process.poll() is None
        finally:
            daemon.stop()
        explicit = start_daemon(
            ["--admin-address", "127.0.0.1:1", str(_script(tmp_path))],
            tmp_path / "e.log",
            env={"ENVOY_AUTORELOAD_CONTROL_SOCKET": str(locked / "c.sock")},
            prefix=NO_DAC,
        )
        try:
            assert explicit.wait_exit(timeout_s=30) == 2
        finally:
            explicit.stop()
    finally:
        locked.chmod(0o700)
    assert "Traceback" not in "\n".join(daemon.lines())
    assert "Permission denied" in one_error_line("\n".join(explicit.lines()))


@needs_setpriv
def test_a_live_socket_we_may_not_connect_to_is_never_stolen(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as owner:
        owner.bind(str(path))
        owner.listen(4)
        path.chmod(0o444)  # connecting needs write permission: EACCES for the newcomer
        inode = path.stat().st_ino
        daemon = start_daemon(
            ["--admin-address", "127.0.0.1:1", str(_script(tmp_path))],
            tmp_path / "d.log",
            env={"ENVOY_AUTORELOAD_CONTROL_SOCKET": str(path)},
            prefix=NO_DAC,
        )
        try:
            assert daemon.wait_exit(timeout_s=30) == 2
        finally:
            daemon.stop()
        assert path.stat().st_ino == inode
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))  # still the owner's
    line = one_error_line("\n".join(daemon.lines()))
    assert "not taking it over" in line and "Permission denied" in line


IMPOSTOR = """
import os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(sys.argv[1])
sock.listen(1)
print("ready", flush=True)
sock.settimeout(60)
conn, _ = sock.accept()
conn.settimeout(60)
conn.recv(100)
try:
    conn.sendall(b'{"ok": true, "message": "serving (impostor)", "epoch": 9}\\n')
except OSError:
    pass
"""


@needs_setpriv
def test_ctl_does_not_believe_a_socket_served_by_another_user() -> None:
    with tempfile.TemporaryDirectory(prefix="edges-ctl-") as directory:
        os.chown(directory, 65534, 65534)
        path = Path(directory) / "c.sock"
        impostor = subprocess.Popen(
            [*NOBODY, sys.executable, "-I", "-c", IMPOSTOR, str(path)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert impostor.stdout is not None and impostor.stdout.readline() == "ready\n"
            result = subprocess.run(
                [str(CTL), "--control-socket", str(path), "reload"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        finally:
            impostor.kill()
            impostor.wait(timeout=30)
            if impostor.stdout is not None:
                impostor.stdout.close()
    assert result.returncode == 3 and result.stdout == "", result.stdout
    (line,) = result.stderr.splitlines()
    assert "served by uid 65534" in line and "not trusting" in line
