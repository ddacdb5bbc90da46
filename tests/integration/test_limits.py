"""A real ENOSPC, in a user namespace of the test's own, and unreadable directories.

Only `/proc/sys/user/max_inotify_watches` is lowered, and only inside a new user
namespace (`unshare -U -r`), where that limit is the namespace's own. The global
`/proc/sys/fs/inotify/*` is never written: here that would change the whole machine.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import Daemon, start_daemon


def _userns_ok() -> bool:
    probe = subprocess.run(["unshare", "-U", "-r", "true"], capture_output=True, check=False)
    return probe.returncode == 0


needs_userns = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _userns_ok(),
    reason="needs unprivileged user namespaces (unshare -U -r)",
)


def _with_watch_limit(limit: int) -> tuple[str, ...]:
    return (
        "unshare",
        "-U",
        "-r",
        "sh",
        "-c",
        f'echo {limit} > /proc/sys/user/max_inotify_watches && exec "$0" "$@"',
    )


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
def test_too_few_watches_is_a_startup_failure_with_a_working_sysctl_line(
    tmp_path: Path, tree: Path, fake_envoy_script: Path, daemons: list[Daemon]
) -> None:
    daemon = start_daemon(
        [*ARGS, "--watch", str(tree), str(fake_envoy_script)],
        tmp_path / "d.log",
        prefix=_with_watch_limit(3),
    )
    daemons.append(daemon)
    assert daemon.wait_exit(timeout_s=60) == 3
    assert daemon.events("watch.limit_low"), "the start-up check warned first"
    errors = [line for line in daemon.lines() if line.startswith("envoy-autoreload: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(daemon.lines())
    match = re.search(r"sysctl -w (user\.max_inotify_watches)=(\d+)", errors[0])
    assert match is not None, errors[0]
    assert "outside the container" in errors[0]
    assert not daemon.events("child.started"), "Envoy is not started without its watches"
    # The line works: run it in a namespace of its own and read the limit back.
    applied = subprocess.run(
        [
            "unshare",
            "-U",
            "-r",
            "sh",
            "-c",
            f"{match.group(0)} >/dev/null && cat /proc/sys/user/max_inotify_watches",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert applied.stdout.strip() == match.group(2)


@needs_userns
def test_watch_degraded_keeps_what_it_can_and_still_restarts_on_sighup(
    tmp_path: Path, tree: Path, fake_envoy_script: Path, daemons: list[Daemon]
) -> None:
    daemon = start_daemon(
        [*ARGS, "--watch-degraded", "--watch", str(tree), str(fake_envoy_script)],
        tmp_path / "d.log",
        prefix=_with_watch_limit(3),
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
def test_enospc_later_keeps_the_daemon_running_and_says_what_is_unseen(
    tmp_path: Path, tree: Path, fake_envoy_script: Path, daemons: list[Daemon]
) -> None:
    # Exactly what start-up needs: the tree's 5 directories and the root's parent.
    daemon = start_daemon(
        [*ARGS, "--watch", str(tree), str(fake_envoy_script)],
        tmp_path / "d.log",
        prefix=_with_watch_limit(6),
    )
    daemons.append(daemon)
    daemon.wait_event("child.serving", epoch=0)
    (tree / "new" / "deeper").mkdir(parents=True)
    reached = daemon.wait_event("watch.limit_reached")
    assert any(p.endswith("new") or p.endswith("deeper") for p in reached["paths"])
    assert daemon.process.poll() is None
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("child.serving", epoch=1)


def test_unreadable_directory_is_named_and_the_rest_is_watched(
    tmp_path: Path, tree: Path, fake_envoy_script: Path, daemons: list[Daemon]
) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv")
    secret = tree / "secret"
    (secret / "inner").mkdir(parents=True)
    secret.chmod(0o000)
    try:
        # Root reads everything; without the DAC-override capabilities it does not.
        daemon = start_daemon(
            [*ARGS, "--watch", str(tree), str(fake_envoy_script)],
            tmp_path / "d.log",
            prefix=("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"),
        )
        daemons.append(daemon)
        warned = daemon.wait_event("watch.unreadable")
        assert warned["paths"] == [str(secret)] and warned["count"] == 1
        started = daemon.wait_event("watch.started")
        assert started["directories"] == 5, "everything else is watched"
        (tree / "c" / "d" / "x.yaml").write_text("x: 2\n")  # and is seen
        daemon.wait_event("restart.requested", reason="files_changed")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    finally:
        secret.chmod(0o755)


@needs_userns
def test_watch_degraded_without_any_inotify_instance_still_serves_and_restarts(
    tmp_path: Path, tree: Path, fake_envoy_script: Path, daemons: list[Daemon]
) -> None:
    prefix = (
        "unshare",
        "-U",
        "-r",
        "sh",
        "-c",
        'echo 0 > /proc/sys/user/max_inotify_instances && exec "$0" "$@"',
    )
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
