"""Shared test helpers: waiting with deadlines, free ports, HTTP over fresh connections."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        yield int(blocker.getsockname()[1])
    finally:
        blocker.close()
