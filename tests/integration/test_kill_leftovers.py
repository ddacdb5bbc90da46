"""A start-up that fails after epoch 0 was spawned (the walk comes after the spawn since
issue 16) leaves nothing: its whole process group is stopped, an Envoy under a start
script that did not `exec` included, and the shared memory is removed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from envoy_autoreload import shutdown as shutdown_module
from envoy_autoreload.child import ScriptChild
from envoy_autoreload.roster import Generation, Roster
from envoy_autoreload.shutdown import Shutdown
from tests.helpers import wait_until


class _Script:
    """A start script that did not exec: the shell leads the group, "Envoy" under it."""

    def __init__(self, command: str = "sleep 60; true") -> None:
        self._command = command

    def spawn(self, epoch: int, snapshot: Path | None = None) -> ScriptChild:
        process = subprocess.Popen(["sh", "-c", self._command], process_group=0)
        return ScriptChild(process, None)

    def started_ahead(self, epoch: int) -> bool:
        return False  # nothing is fired ahead here (ready_start.py)


class _Reactor:
    def now(self) -> float:
        return time.monotonic()


class _Family:
    def __init__(self) -> None:
        self.observed: list[int] = []
        self.removed = False

    def observe(self, gen: Generation) -> None:
        self.observed.append(gen.epoch)

    def remove_shared_memory(self) -> None:
        self.removed = True


def _live_members(group: int) -> list[int]:
    """PIDs in the process group that are not zombies."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_a_failed_start_up_stops_the_whole_group_and_removes_the_shared_memory() -> None:
    roster = Roster(_Script(), _Reactor())  # type: ignore[arg-type]
    gen = roster.spawn(0, "startup", covers_seq=0, snapshot=None, binary=None)
    family = _Family()
    try:
        wait_until(lambda: len(_live_members(gen.pid)) == 2, timeout_s=10, what="sh and sleep")
        shutdown = Shutdown(_Reactor(), roster, family, 1.0, None)  # type: ignore[arg-type]
        began = time.monotonic()
        shutdown.kill_leftovers()
        assert time.monotonic() - began < 3.0, "SIGTERM is enough: no 5 s wait"
        assert gen.process.returncode is not None
        wait_until(lambda: not _live_members(gen.pid), timeout_s=10, what="the group gone")
        assert family.observed == [0], "its base id is looked for before it is stopped"
        assert family.removed
    finally:
        gen.process.kill()
        gen.process.wait(5)


def test_a_helper_that_ignores_sigterm_is_killed_with_the_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The script left a helper in the background that ignores SIGTERM: once the
    shell is gone it still runs in the group, and gets SIGKILL after the wait."""
    monkeypatch.setattr(shutdown_module, "KILL_REAP_WAIT_S", 0.5)
    script = _Script("(trap '' TERM; sleep 60) & sleep 60; true")
    roster = Roster(script, _Reactor())  # type: ignore[arg-type]
    gen = roster.spawn(0, "startup", covers_seq=0, snapshot=None, binary=None)
    try:
        wait_until(lambda: len(_live_members(gen.pid)) >= 3, timeout_s=10, what="all started")
        shutdown = Shutdown(_Reactor(), roster, _Family(), 1.0, None)  # type: ignore[arg-type]
        shutdown.kill_leftovers()
        assert gen.process.returncode is not None
        wait_until(lambda: not _live_members(gen.pid), timeout_s=10, what="the helper gone")
    finally:
        for pid in _live_members(gen.pid):  # ours: the group this test started
            os.kill(pid, signal.SIGKILL)
        gen.process.kill()
        gen.process.wait(5)
