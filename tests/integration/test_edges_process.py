"""Which process of a generation is Envoy, asked of real processes through /proc; and
Envoy's own lines in the JSON log whatever --log-level says."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from envoy_autoreload.envoy_process import find_envoy
from tests.daemon import start_daemon
from tests.helpers import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = Path(f"/proc/{current}/task/{tid}/children").read_text().split()
            except OSError:
                continue
            found += [int(c) for c in children]
            frontier += [int(c) for c in children]
    return found


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


@pytest.fixture
def group() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start scripts, each in its own process group, killed (by group id) afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def _script(group: list[subprocess.Popen[bytes]], body: str, running: list[str]) -> int:
    process = subprocess.Popen(["sh", "-c", body], start_new_session=True)
    group.append(process)
    wait_until(
        lambda: (
            sorted(
                os.path.basename(e) for p in _descendants(process.pid) if (e := _exe(p)) is not None
            )
            == sorted(running)
        ),
        timeout_s=30,
        what=f"{running} running under the script",
    )
    return process.pid


def test_a_helper_with_c_before_envoy_is_not_taken_for_envoy(
    group: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    tail = shutil.which("tail")
    assert tail is not None
    tail_name = os.path.basename(os.path.realpath(tail))
    # The review's repro: a helper with `-c` runs while the script prepares.
    pid = _script(group, "tail -c +1 -f /dev/null & wait", [tail_name])
    assert find_envoy(pid) is None
    # Positive control: the same helper beside an Envoy (a copy of `sleep` named so).
    envoy = tmp_path / "envoy"
    shutil.copy(os.path.realpath(shutil.which("sleep") or "/bin/sleep"), envoy)
    pid = _script(group, f"tail -c +1 -f /dev/null & {envoy} 60 & wait", [tail_name, "envoy"])
    found = find_envoy(pid)
    assert found is not None and found.exe == str(envoy)


def test_the_expected_binary_is_envoy_whatever_its_name(
    group: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    proxy = tmp_path / "proxy"
    shutil.copy(os.path.realpath(shutil.which("sleep") or "/bin/sleep"), proxy)
    pid = _script(group, f"head -c 1 /dev/zero >/dev/null; {proxy} 60 & wait", ["proxy"])
    assert find_envoy(pid) is None, "an unknown binary without --restart-epoch is not Envoy"
    found = find_envoy(pid, expected_exe=proxy)
    assert found is not None and found.exe == str(proxy)


def test_envoys_lines_reach_the_json_log_at_log_level_error(tmp_path: Path) -> None:
    line = "[2026-01-01 12:00:00.123][7][critical][main] [source/x.cc:1] config is wrong"
    script = tmp_path / "start.sh"
    script.write_text(f"#!/bin/sh\necho '{line}' >&2\necho 'plain words' >&2\nexec sleep 60\n")
    script.chmod(0o755)
    daemon = start_daemon(
        ["--log-level", "error", "--admin-address", "127.0.0.1:1", str(script)],
        tmp_path / "d.log",
    )
    try:
        critical = daemon.wait_event("envoy.output", message=line)
        plain = daemon.wait_event("envoy.output", message="plain words")
    finally:
        daemon.stop()
    assert critical["level"] == "critical" and critical["epoch"] == 0
    assert plain["level"] == "info"
    assert not daemon.events("daemon.started"), "--log-level error still hides our INFO"
