"""Shared test helpers: waiting with deadlines, ports no one else is given, HTTP over fresh
connections."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import http.client
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, TypeVar

from envoy_autoreload.standby import NAME as STANDBY_NAME
from envoy_autoreload.standby import SURVEY_NAME

T = TypeVar("T")


class WaitTimeout(AssertionError):
    pass


def wait_until(
    predicate: Callable[[], T | None],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.02,
) -> T:
    """Poll `predicate` until it returns something truthy; fail saying what was awaited."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout_s:g} s waiting for {what}; last: {last!r}")
        time.sleep(interval_s)


# -- ports ------------------------------------------------------------------------------
# Ports for Envoy come from below the kernel's ephemeral range. A port the kernel hands
# out for `bind(0)` lies in that range, the same one every client connection (our probes,
# the daemon's admin calls) takes its local port from, so between our unbind and Envoy's
# bind a connection could take it: a full run once failed with `cannot bind
# '127.0.0.1:39791': Address already in use`. Below the range only explicit binds land.
#
# Each port handed out is flock'ed in a directory every test run on the machine shares (and
# bench/_common.py too), and stays locked until this process exits: two pytest processes,
# or one test and a bench, never get the same port. The kernel drops the lock with the
# process, so a crashed run leaves no stale claim behind (the files stay; they are empty).
# A bind check then skips ports something else (not cooperating) is bound to.

PORT_LOCK_DIR: Final = Path("/tmp/envoy-autoreload-test-ports")
PORT_FLOOR: Final = 20000
PORT_CEILING: Final = 32000  # inclusive; lowered to stay below the ephemeral range
_PORT_BLOCK: Final = 256  # a run starts at a PID-picked block, so parallel runs rarely meet


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for local ports of connect() and bind(0) (ip(7))."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return int(low), int(high)


def allocatable_ports() -> range:
    """The ports tests may take: PORT_FLOOR up to below the ephemeral range."""
    ceiling = min(PORT_CEILING, ephemeral_port_range()[0] - 1)
    if ceiling - PORT_FLOOR < 1000:
        raise AssertionError(
            f"ip_local_port_range starts at {ephemeral_port_range()[0]}: fewer than 1000 "
            f"ports left below it from {PORT_FLOOR} for tests"
        )
    return range(PORT_FLOOR, ceiling + 1)


def _is_bindable(port: int) -> bool:
    """Nothing is bound to 127.0.0.1:port now. No SO_REUSEADDR, so a port still in
    TIME_WAIT counts as taken too: stricter than Envoy needs, never looser."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class PortAllocator:
    """Hands out each of `ports` (tried in that order) at most once across every process
    that uses the same `lock_dir`: a port is taken when its lock file is flock'ed by us
    and nothing is bound to it. Locks are held until `close()` or process exit."""

    def __init__(self, ports: Sequence[int], lock_dir: Path = PORT_LOCK_DIR) -> None:
        self._ports = list(ports)
        self._next = 0
        self._lock_dir = lock_dir
        self._held: dict[int, int] = {}  # port -> fd of its flock'ed lock file
        self._mutex = threading.Lock()

    def allocate(self) -> int:
        with self._mutex:
            self._make_lock_dir()
            while self._next < len(self._ports):
                port = self._ports[self._next]
                self._next += 1
                fd = self._lock(port)
                if fd is None:
                    continue  # another process (or allocator) has it
                if not _is_bindable(port):
                    os.close(fd)  # bound by someone outside the scheme; leave it to them
                    continue
                self._held[port] = fd
                return port
        raise AssertionError(
            f"no free port left among {len(self._ports)} candidates (locks in {self._lock_dir})"
        )

    def _make_lock_dir(self) -> None:
        try:
            self._lock_dir.mkdir(parents=True)
        except FileExistsError:
            return
        self._lock_dir.chmod(0o1777)  # like /tmp: any user's run can add its lock files

    def _lock(self, port: int) -> int | None:
        path = self._lock_dir / f"{port}.lock"
        # Read-only is enough for flock, and opens another user's lock file; O_CREAT only
        # when it is missing (fs.protected_regular refuses O_CREAT on another user's file
        # in a sticky directory). Non-inheritable (PEP 446): no child of ours holds it.
        try:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        except PermissionError:
            return None  # not ours to take; skipping a port is always safe
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def held_fds(self) -> set[tuple[int, str]]:
        """(fd, target) of each lock file held, as /proc/self/fd shows them."""
        with self._mutex:
            return {(fd, os.readlink(f"/proc/self/fd/{fd}")) for fd in self._held.values()}

    def close(self) -> None:
        """Release every port (a short-lived allocator; the session's one never closes)."""
        with self._mutex:
            for fd in self._held.values():
                os.close(fd)
            self._held.clear()


def _session_ports() -> list[int]:
    """The test range rotated to a block picked by PID: parallel runs start apart."""
    ports = allocatable_ports()
    blocks = max(1, len(ports) // _PORT_BLOCK)
    start = (os.getpid() % blocks) * _PORT_BLOCK
    return [*ports[start:], *ports[:start]]


@functools.cache
def _session_allocator() -> PortAllocator:
    """Built on first use, not at import: a machine with no room below the ephemeral
    range fails the tests that need a port, not every import of this module."""
    return PortAllocator(_session_ports())


def free_port() -> int:
    """A port on 127.0.0.1 that nothing holds and no other test or bench will be given
    while this process lives (see PORT_LOCK_DIR above)."""
    return _session_allocator().allocate()


def port_lock_fds() -> set[tuple[int, str]]:
    """The lock files `free_port()` holds for the whole session: open on purpose, so the
    fd-leak guard leaves exactly these out."""
    if _session_allocator.cache_info().currsize == 0:
        return set()
    return _session_allocator().held_fds()


def http_get(port: int, path: str = "/", timeout_s: float = 2.0) -> tuple[int, str] | None:
    """GET over a new connection (never kept alive: ENVOY_FACTS §9); None on any failure."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


# Base ids handed out in this test process, so leak checks judge only our own segments
# (another test run on the machine has its own).
ALLOCATED_BASE_IDS: set[int] = set()
_base_ids = itertools.count(20000 + (os.getpid() % 400) * 50)


def shm_of(base_id: int) -> str:
    return f"/dev/shm/envoy_shared_memory_{base_id * 10}"


def allocate_base_id() -> int:
    for base_id in _base_ids:
        if not os.path.exists(shm_of(base_id)):
            ALLOCATED_BASE_IDS.add(base_id)
            return base_id
    raise AssertionError("unreachable")


def holds_for(
    predicate: Callable[[], bool], *, duration_s: float, what: str, interval_s: float = 0.05
) -> None:
    """Assert `predicate` stays true for `duration_s`: the observation window a "nothing
    happens" claim needs (it fails the moment something does)."""
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        assert predicate(), f"expected {what} for {duration_s:g} s"
        time.sleep(interval_s)


@contextlib.contextmanager
def port_held() -> Iterator[int]:
    """A port another process listens on: an Envoy config that binds it cannot start,
    and `envoy --mode validate` cannot tell (ENVOY_FACTS §1)."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", free_port()))
    blocker.listen()
    try:
        yield int(blocker.getsockname()[1])
    finally:
        blocker.close()


def write_executable(path: Path, text: str) -> Path:
    """A script the tests run as a fake `envoy` or start script."""
    path.write_text(text)
    path.chmod(0o755)
    return path


def children_of(pid: int) -> list[int]:
    """The child processes of `pid`, from every thread's list in /proc."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def daemon_children(pid: int) -> list[int]:
    """The daemon's child processes, less its standby (standby.py): the next spawn,
    made ahead, which is not Envoy nor a check; nor the shell surveyed once before it."""
    return [child for child in children_of(pid) if not _is_standby(child)]


def _is_standby(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return len(argv) > 3 and argv[3] in (STANDBY_NAME.encode(), SURVEY_NAME.encode())


def exited(pid: int) -> bool:
    """Gone, or a zombie: exited, not reaped yet (`pid_alive` is True for a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def pid_alive(pid: int) -> bool:
    """Whether a process (or a zombie not reaped yet) holds `pid`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
