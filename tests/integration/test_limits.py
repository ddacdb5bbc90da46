"""--watch-degraded: with inotify limits too low (real ones, in the test's own user
namespace, see tests/userns.py), the daemon watches what it can and still restarts.

A stand-in Envoy keeps these fast; the rows of the fault matrix with the real Envoy are
in tests/envoy/test_faults_startup.py.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon, start_daemon
from tests.userns import needs_userns, with_inotify_limit


@pytest.fixture
def fake_envoy_script(tmp_path: Path) -> Path:
    """A start script whose child looks like Envoy to /proc (a `sleep` named envoy)."""
    binary = tmp_path / "bin" / "envoy"
    binary.parent.mkdir()
    shutil.copy("/bin/sleep", binary)
    script = tmp_path / "start.sh"
    script.write_text(f"#!/bin/sh\nexec {binary} 600\n")
    script.chmod(0o755)
    return script


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "conf"
    for sub in ("a", "b", "c/d"):
        (root / sub).mkdir(parents=True)
        (root / sub / "x.yaml").write_text("x: 1\n")
    return root


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


ARGS = ("--no-watch-binary", "--base-id", "99999", "--term-wait", "5")


@needs_userns
@needs_userns
def test_watch_degraded_keeps_what_it_can_and_still_restarts_on_sighup(
    tmp_path: Path, tree: Path, fake_envoy_script: Path, daemons: list[Daemon]
) -> None:
    daemon = start_daemon(
        [*ARGS, "--watch-degraded", "--watch", str(tree), str(fake_envoy_script)],
        tmp_path / "d.log",
        prefix=with_inotify_limit(3),
    )
    daemons.append(daemon)
    degraded = daemon.wait_event("watch.degraded")
    assert degraded["count"] >= 1 and "sysctl -w user.max_inotify_watches" in degraded["message"]
    daemon.wait_event("child.serving", epoch=0)
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("child.serving", epoch=1)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0


@needs_userns
@needs_userns
def test_watch_degraded_without_any_inotify_instance_still_serves_and_restarts(
    tmp_path: Path, tree: Path, fake_envoy_script: Path, daemons: list[Daemon]
) -> None:
    prefix = with_inotify_limit(0, "instances")
    daemon = start_daemon(
        [*ARGS, "--watch-degraded", "--watch", str(tree), str(fake_envoy_script)],
        tmp_path / "d.log",
        prefix=prefix,
    )
    daemons.append(daemon)
    degraded = daemon.wait_event("watch.degraded")
    assert "instance limit" in degraded["message"]
    assert "user.max_inotify_instances" in degraded["message"]
    daemon.wait_event("child.serving", epoch=0)
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("child.serving", epoch=1)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
