"""The port allocator in tests/helpers.py: below the ephemeral range, never the same port
twice, not even to another process, and the fd-leak guard still catches real leaks.

Cross-process checks run a real second Python process holding real flock()s. It uses a
lock directory of its own under tmp_path, over candidate ports this session's
`free_port()` has already claimed in the shared directory: no other test run can be
given those ports meanwhile, so what these tests see is only what they did.
"""

from __future__ import annotations

import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import _open_fds, leaked_fds
from tests.helpers import (
    PortAllocator,
    allocatable_ports,
    ephemeral_port_range,
    free_port,
    port_held,
)

REPO = Path(__file__).resolve().parents[2]

# Takes `count` ports from the candidates in `lock_dir`, prints them, and holds the locks
# until its stdin closes.
HOLDER = """\
import sys
from pathlib import Path
from tests.helpers import PortAllocator
lock_dir, count, *candidates = sys.argv[1:]
allocator = PortAllocator([int(p) for p in candidates], Path(lock_dir))
print(*(allocator.allocate() for _ in range(int(count))), flush=True)
sys.stdin.read()
"""


class Holder:
    """Another process holding port locks; `release()` lets it exit."""

    def __init__(self, lock_dir: Path, count: int, candidates: list[int]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(lock_dir), str(count), *map(str, candidates)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            text=True,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 30)
        assert ready, "the holder process never reported its ports"
        self.ports = [int(p) for p in self.process.stdout.readline().split()]

    def release(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        assert self.process.wait(timeout=30) == 0
        self.process.stdout.close()


@pytest.fixture
def lock_dir(tmp_path: Path) -> Path:
    return tmp_path / "locks"


@pytest.fixture
def allocators() -> Iterator[list[PortAllocator]]:
    """Short-lived allocators, closed whatever the test does."""
    made: list[PortAllocator] = []
    yield made
    for allocator in made:
        allocator.close()


def test_ports_are_below_the_ephemeral_range() -> None:
    low, _ = ephemeral_port_range()
    assert allocatable_ports()[-1] < low
    ports = [free_port() for _ in range(20)]
    assert all(1024 <= port < low for port in ports), (ports, low)


def test_two_allocations_never_return_the_same_port() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)


def test_two_processes_never_get_the_same_port(
    lock_dir: Path, allocators: list[PortAllocator]
) -> None:
    candidates = [free_port() for _ in range(10)]
    ours = PortAllocator(candidates, lock_dir)
    allocators.append(ours)
    mine = [ours.allocate() for _ in range(5)]
    holder = Holder(lock_dir, 5, candidates)  # the same candidates, in the same order
    try:
        assert not set(mine) & set(holder.ports), (mine, holder.ports)
        assert sorted(mine + holder.ports) == sorted(candidates)
        with pytest.raises(AssertionError, match="no free port"):
            ours.allocate()  # the holder has all the rest
    finally:
        holder.release()


def test_a_port_locked_by_another_process_is_skipped(
    lock_dir: Path, allocators: list[PortAllocator]
) -> None:
    first, second = free_port(), free_port()
    holder = Holder(lock_dir, 1, [first])
    try:
        assert holder.ports == [first]
        while_held = PortAllocator([first, second], lock_dir)
        allocators.append(while_held)
        assert while_held.allocate() == second
    finally:
        holder.release()
    # The positive control: the same candidates, the lock gone with its process.
    after = PortAllocator([first, second], lock_dir)
    allocators.append(after)
    assert after.allocate() == first


def test_a_port_something_is_bound_to_is_skipped(
    lock_dir: Path, allocators: list[PortAllocator]
) -> None:
    spare = free_port()
    with port_held() as held:
        allocator = PortAllocator([held, spare], lock_dir)
        allocators.append(allocator)
        assert allocator.allocate() == spare


def test_the_fd_guard_forgives_the_session_port_locks_and_nothing_else(
    lock_dir: Path, allocators: list[PortAllocator], tmp_path: Path
) -> None:
    before = _open_fds()
    free_port()  # may open a lock file for the session: not a leak
    assert not leaked_fds(before)
    stray = PortAllocator([free_port()], lock_dir)
    allocators.append(stray)
    stray.allocate()
    assert {target for _, target in leaked_fds(before)} == {str(next(lock_dir.iterdir()))}
    stray.close()
    with open(tmp_path / "plain", "w") as plain:
        assert {target for _, target in leaked_fds(before)} == {plain.name}
    assert not leaked_fds(before)
