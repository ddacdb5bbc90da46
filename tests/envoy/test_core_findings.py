"""The core's containment and the REVIEW-core findings that need the real Envoy to show
(the rest are replayed in tests/simulation/test_findings.py). Each test failed on the
code before its fix (ce83050)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import start_daemon
from tests.envoy.conftest import EnvoyFamily
from tests.envoy.probe import ServingProbe
from tests.helpers import children_of, holds_for, wait_until

# Runs the real daemon with one handler made to raise once: the probe of epoch 1.
INJECT_ONE_FAULT = """
import sys
from envoy_autoreload import launcher
original = launcher.Launcher.probe
fired = []
def probe(self):
    gen = self._roster.starting()
    if gen is not None and gen.epoch == 1 and not fired:
        fired.append(1)
        raise RuntimeError("injected fault")
    return original(self)
launcher.Launcher.probe = probe
from envoy_autoreload.cli import cli
cli.main(args=sys.argv[1:], prog_name="envoy-autoreload")
"""


def write_bytes_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def serves(family: EnvoyFamily, body: str) -> None:
    wait_until(lambda: family.body() == body, timeout_s=30, what=f"the listener to serve {body}")


def test_an_exception_in_a_handler_leaves_envoy_serving_and_the_next_change_applied(
    envoy_family: EnvoyFamily,
) -> None:
    log = envoy_family.root.parent / "contained.daemon.log"
    daemon = start_daemon(
        [*envoy_family.watched(), str(envoy_family.script)],
        log,
        entry=("-c", INJECT_ONE_FAULT),
    )
    envoy_family.daemons.append(daemon)
    daemon.wait_event("child.serving", epoch=0)
    envoy_family.write_config("v1")
    error = daemon.wait_event("daemon.internal_error")
    assert "injected fault" in error["message"] and "Traceback" in error["output"]
    daemon.wait_event("child.serving", epoch=1)  # the probe was re-armed
    serves(envoy_family, "v1")
    envoy_family.write_config("v2")
    daemon.wait_event("child.serving", epoch=2)
    serves(envoy_family, "v2")
    assert daemon.process.poll() is None
    assert len(daemon.events("daemon.internal_error")) == 1
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0


def test_finding_1_a_config_that_is_not_utf8_is_served_and_the_daemon_lives(
    envoy_family: EnvoyFamily,
) -> None:
    """yaml-cpp passes a Latin-1 byte in a comment through, so Envoy validates and
    serves it; the daemon's own read of the file used to raise and kill every Envoy."""
    daemon = envoy_family.start(*envoy_family.watched())
    daemon.wait_event("child.serving", epoch=0)
    latin1 = envoy_family.render("v1").encode() + b"# caf\xe9, pasted from a Windows editor\n"
    write_bytes_atomically(envoy_family.config, latin1)
    daemon.wait_event("validation.passed", epoch=0, count=2)
    daemon.wait_event("child.serving", epoch=1)
    serves(envoy_family, "v1")
    assert not daemon.events("daemon.internal_error")
    assert daemon.process.poll() is None
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0


def test_finding_3_a_config_other_than_the_scripts_is_named_at_live(
    envoy_family: EnvoyFamily,
) -> None:
    other = envoy_family.root / "elsewhere" / "envoy.yaml"
    other.parent.mkdir()
    shutil.copy(envoy_family.config, other)
    envoy_family.write_script(snapshot=False)  # a drop-in script: -c of its own file
    daemon = envoy_family.start("--config", str(other))
    mismatch = daemon.wait_event("config.mismatch")
    assert str(other) in mismatch["message"] and str(envoy_family.config) in mismatch["message"]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0


def _can_unshare_pid() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"],
        capture_output=True,
        check=False,
        timeout=10,
    )
    return probe.returncode == 0


def _zombies_of(pid: int) -> list[int]:
    zombies = []
    for child in children_of(pid):
        try:
            stat = Path(f"/proc/{child}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            zombies.append(child)
    return zombies


@pytest.mark.skipif(not _can_unshare_pid(), reason="needs `unshare --pid` (root)")
def test_finding_14_as_pid_1_the_daemon_reaps_orphans(envoy_family: EnvoyFamily) -> None:
    """In a container without an init the daemon is PID 1: a start script's background
    helper is reparented to it when the script execs Envoy, and must not stay a zombie."""
    envoy_family.write_script(prelude="(sleep 0.3 &)\n")
    daemon = envoy_family.start(
        *envoy_family.watched(),
        prefix=("unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM"),
    )
    daemon.wait_event("child.serving", epoch=0)
    ours = wait_until(
        lambda: children_of(daemon.pid) or None, timeout_s=10, what="the daemon under unshare"
    )
    inner = ours[0]
    try:
        envoy_family.write_config("v1")  # a second start script, a second orphan
        daemon.wait_event("child.serving", epoch=1)
        wait_until(
            lambda: not _zombies_of(inner),
            timeout_s=10,
            what="the orphaned helpers to be reaped",
        )
        os.kill(inner, signal.SIGTERM)  # the daemon itself; unshare only waits for it
        assert daemon.wait_exit() == 0  # unshare exits with the daemon's code
    finally:
        if daemon.process.poll() is None:  # a failure above: never leave it behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(inner, signal.SIGKILL)


def test_finding_15_an_access_log_inside_the_watched_tree_restarts_nothing(
    envoy_family: EnvoyFamily,
) -> None:
    """Every `envoy --mode validate` reopens the log (an IN_CLOSE_WRITE) and every
    request grows it: in the digest, each restart's validation found new log lines and
    asked for the next restart, for as long as traffic flowed."""
    log = envoy_family.root / "access.log"
    envoy_family.write_config("v0", access_log=log)
    daemon = envoy_family.start(*envoy_family.watched("--debounce", "0.1"))
    daemon.wait_event("child.serving", epoch=0)
    with ServingProbe(envoy_family.listener_port) as probe:  # traffic the whole time
        wait_until(lambda: log.stat().st_size > 0, timeout_s=10, what="a log line")
        envoy_family.write_config("v1", access_log=log)  # one change, one restart
        daemon.wait_event("child.serving", epoch=1)
        holds_for(
            lambda: len(daemon.events("restart.requested")) == 1,
            duration_s=4.0,
            what="exactly one restart while the access log keeps growing",
        )
    probe.assert_never_failed()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0


def test_finding_12_a_stderr_nobody_reads_does_not_stall_restarts(
    envoy_family: EnvoyFamily,
) -> None:
    """A paused terminal or a stalled log driver: the daemon's stderr is a pipe nobody
    reads while Envoy logs at trace level. Writes used to block the loop, and with it
    every restart; now they queue, bounded, and the excess is dropped."""
    text = envoy_family.script.read_text().replace("--log-level info", "--log-level trace")
    envoy_family.script.write_text(text)
    sock = envoy_family.root.parent / "unread.sock"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "envoy_autoreload",
            *envoy_family.watched(),
            str(envoy_family.script),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "ENVOY_AUTORELOAD_CONTROL_SOCKET": str(sock)},
    )
    try:
        serves(envoy_family, "v0")
        for version in ("v1", "v2", "v3"):
            envoy_family.write_config(version)
            serves(envoy_family, version)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)  # reads the pipe at last
    assert process.returncode == 0
    assert b"child.serving" in output
