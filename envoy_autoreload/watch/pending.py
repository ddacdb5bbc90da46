"""The paths events named and the digest has not applied yet, in the order they came.

A 10,000-file burst is applied a slice of loop time per turn while it is still being
written (issue 16, goal 5). The slice used to take chunks of the pending set, sorting
all of it for each chunk, and checked the time only between chunks of 256 files: on a
slow 2-vCPU VM a chunk alone took the turn past 50 ms. Here the order is kept as the
paths arrive, so a slice pops them one at a time and stops on time.

Why arrival order is "parents first", which applying needs (a file in a directory the
scan does not know yet would rescan the root): the kernel queues a directory's IN_CREATE
before any event in it, so a parent comes in an earlier read than its children or in
the same one, and each read is sorted as it is added. A path named again while it still
waits keeps its place: reading it later reads the newer content anyway.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator


class PendingPaths:
    def __init__(self) -> None:
        self._queue: deque[str] = deque()
        self._members: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self._queue)

    def __len__(self) -> int:
        return len(self._queue)

    def __contains__(self, path: object) -> bool:
        return path in self._members

    def add(self, paths: Iterable[str]) -> None:
        """Queue the paths of one read (sorted among themselves) not already waiting."""
        fresh = sorted(set(paths) - self._members)
        self._queue.extend(fresh)
        self._members.update(fresh)

    def pop_until(self, deadline: float) -> Iterator[str]:
        """The waiting paths in order, each taken off the queue as it is handed out,
        until `time.monotonic()` reaches `deadline` (at least one is handed out: a slice
        always makes progress, however slow the machine)."""
        first = True
        while self._queue and (first or time.monotonic() < deadline):
            first = False
            path = self._queue.popleft()
            self._members.discard(path)
            yield path

    def take_all(self) -> list[str]:
        """Every waiting path, in order; the queue is left empty."""
        paths = list(self._queue)
        self.clear()
        return paths

    def clear(self) -> None:
        self._queue.clear()
        self._members.clear()
