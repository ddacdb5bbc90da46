"""Guards for every test: nothing a test starts may outlive it."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ALLOCATED_BASE_IDS, port_lock_fds, shm_of, wait_until


def _children() -> set[int]:
    children: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            children.update(int(pid) for pid in (task / "children").read_text().split())
        except OSError:
            continue
    return children


def _open_fds() -> set[tuple[int, str]]:
    """(fd, what it points at): listing /proc/self/fd opens a descriptor of its own,
    whose number a later leak may reuse, so the number alone proves nothing."""
    fds: set[tuple[int, str]] = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
        if not target.startswith("/dev/pts"):
            fds.add((int(name), target))
    return fds


def leaked_fds(before: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Descriptors open now that were not in `before`, less the port locks `free_port()`
    holds for the whole session on purpose (tests/helpers.py): only those exact (fd,
    lock file) pairs, so any other descriptor a test leaves open, a stray lock file
    included, still fails it."""
    return _open_fds() - before - port_lock_fds()


@pytest.fixture(autouse=True)
def nothing_leaks() -> Iterator[None]:
    ids_before = set(ALLOCATED_BASE_IDS)
    fds_before = _open_fds()
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    wait_until(
        lambda: _children() <= children_before or None,
        timeout_s=15,
        what="the test's child processes to be gone",
    )
    ours = ALLOCATED_BASE_IDS - ids_before
    leaked_shm = [shm_of(i) for i in sorted(ours) if os.path.exists(shm_of(i))]
    assert not leaked_shm, f"shared memory left behind: {leaked_shm}"
    leaked_threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    assert not leaked_threads, f"threads left running: {leaked_threads}"
    leaked = leaked_fds(fds_before)
    assert not leaked, f"file descriptors left open: {sorted(leaked)}"


@pytest.fixture(autouse=True)
def private_state_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every daemon a test runs keeps its config generations apart: the machine's
    /var/lib/envoy-autoreload would carry history (a failed config) from test to test."""
    monkeypatch.setenv("ENVOY_AUTORELOAD_STATE_DIR", str(tmp_path_factory.mktemp("state")))
