"""Re-exec in place against the real Envoy: SIGUSR2 or `envoy-autoreloadctl reexec` makes
the daemon `execve` itself (same PID) and the new image adopts the running family.
Envoy keeps serving throughout; a draining epoch, a validation in progress, a SIGHUP in
the exec window and a broken new image are each handled without losing anything."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import Daemon, Event
from tests.envoy.conftest import ENVOY_BIN, EnvoyFamily
from tests.envoy.probe import ServingProbe
from tests.helpers import free_port, http_get, wait_until

CTL = Path(sys.executable).parent / "envoy-autoreloadctl"
PACKAGE = Path(__file__).resolve().parents[2] / "envoy_autoreload"
ADOPTED_MESSAGE = "a re-executed image: adopting the running family"


def _ctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    sock = daemon.log_path.with_suffix(".sock")
    return subprocess.run(
        [str(CTL), "--control-socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _status(daemon: Daemon) -> dict[str, Any]:
    result = _ctl(daemon, "status", "--json")
    assert result.returncode == 0, result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def _serves(family: EnvoyFamily, body: str, timeout_s: float = 30.0) -> None:
    wait_until(lambda: family.body() == body, timeout_s=timeout_s, what=f"{body!r} served")


def _parent_of(pid: int) -> int | None:
    """The PPid of a live process (None once it is gone or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[1])


def _reexeced(daemon: Daemon, timeout_s: float = 30.0) -> Event:
    """The new image took over: `daemon.adopted`, after a second `daemon.started`
    saying it adopts, in the same process."""
    adopted = daemon.wait_event("daemon.adopted", timeout_s=timeout_s)
    started = daemon.events("daemon.started")
    assert len(started) == 2, started
    assert started[1]["message"] == ADOPTED_MESSAGE, started[1]
    assert started[0]["pid"] == started[1]["pid"] == daemon.pid
    assert started[1]["line"] < adopted["line"]
    assert daemon.process.poll() is None, "the daemon's process ended"
    return adopted


def _first_version(daemon: Daemon) -> str:
    version = daemon.events("daemon.started")[0]["version"]
    assert isinstance(version, str)
    return version


def _ts(event: Event) -> float:
    return datetime.fromisoformat(str(event["ts"])).timestamp()


def _stop_cleanly(daemon: Daemon) -> None:
    """SIGTERM: the daemon exits 0 and every Envoy it ever started exited 0."""
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0, "\n".join(daemon.lines()[-40:])
    started = {e["pid"] for e in daemon.events("child.started")}
    exited = {e["pid"]: e for e in daemon.events("child.exited")}
    assert started <= exited.keys(), (started, exited)
    assert all(exited[pid]["status"] == "exit status 0" for pid in started), exited
    assert not daemon.events("child.died"), daemon.events("child.died")


def test_sigusr2_keeps_envoy_serving_with_the_same_pids_and_changes_still_apply(
    envoy_family: EnvoyFamily,
) -> None:
    daemon = envoy_family.start(*envoy_family.watched())
    serving = daemon.wait_event("child.serving", epoch=0)
    envoy_pid = serving["pid"]
    with ServingProbe(envoy_family.listener_port, interval_s=0.05) as probe:
        daemon.signal(signal.SIGUSR2)
        adopted = _reexeced(daemon)
        probe.wait_for_body("v0")  # a client arriving after the take-over is served
        exec_event = daemon.wait_event("daemon.reexec")
        requested = daemon.wait_event("reexec.requested", reason="SIGUSR2")
        assert requested["line"] < exec_event["line"] < adopted["line"]
        assert exec_event["epochs"] == adopted["epochs"] == [0], (exec_event, adopted)
        assert exec_event["pids"] == adopted["pids"] == [envoy_pid], (exec_event, adopted)
        assert adopted["version"] == _first_version(daemon)
        assert _parent_of(envoy_pid) == daemon.pid, "Envoy is no longer the daemon's child"
        assert [e["pid"] for e in daemon.events("child.serving")] == [envoy_pid]
        assert not daemon.events("child.started", epoch=1)

        envoy_family.write_config("v1")
        daemon.wait_event("child.serving", epoch=1)
        probe.wait_for_body("v1")
        drained = daemon.wait_event("child.exited", epoch=0)
        assert drained["pid"] == envoy_pid and drained["message"] == "drain finished", drained
    probe.assert_never_failed()
    assert daemon.process.poll() is None and daemon.process.pid == daemon.pid
    assert not daemon.events("reexec.refused")
    _stop_cleanly(daemon)


def test_a_draining_parent_is_adopted_and_its_drain_ends_normally(
    envoy_family: EnvoyFamily,
) -> None:
    envoy_family.write_script(parent_shutdown_s=6)
    # A short probation, so that epoch 1's is still running at the exec and must resume.
    daemon = envoy_family.start(*envoy_family.watched("--health-window", "3"))
    parent = daemon.wait_event("child.serving", epoch=0)
    envoy_family.write_config("v1")
    child = daemon.wait_event("child.serving", epoch=1)
    daemon.signal(signal.SIGUSR2)
    adopted = _reexeced(daemon)
    assert adopted["epochs"] == [0, 1], adopted
    assert adopted["pids"] == [parent["pid"], child["pid"]], adopted
    assert not daemon.events("child.exited", epoch=0), "the drain ended before the re-exec"

    exited = daemon.wait_event("child.exited", epoch=0, timeout_s=30)
    assert exited["line"] > adopted["line"]
    assert exited["pid"] == parent["pid"], exited
    assert exited["message"] == "drain finished", exited
    assert exited["status"] == "exit status 0", exited
    draining = daemon.wait_event("child.draining", epoch=0)
    drained_s = _ts(exited) - _ts(draining)
    assert 5.0 <= drained_s <= 9.0, f"the drain took {drained_s:.1f} s, not ~6 s"
    assert not daemon.events("child.died"), daemon.events("child.died")
    assert not daemon.events("child.drain_cut"), daemon.events("child.drain_cut")
    # Its stderr pipe was inherited: its last words reached the new image's log.
    said = [
        e for e in daemon.events("envoy.output", pid=parent["pid"]) if e["line"] > adopted["line"]
    ]
    assert any("exiting" in str(e["message"]) for e in said), said
    # Epoch 1's probation resumed in the new image and ended once.
    passed = daemon.wait_event("health.passed", epoch=1, timeout_s=15)
    assert passed["line"] > adopted["line"]
    assert len(daemon.events("health.passed", epoch=1)) == 1
    _serves(envoy_family, "v1")
    status = _status(daemon)
    assert status["serving"]["pid"] == child["pid"] and status["serving"]["epoch"] == 1, status
    assert status["draining"] == [], status
    assert [e["pid"] for e in daemon.events("child.serving")] == [parent["pid"], child["pid"]]
    _stop_cleanly(daemon)


def test_a_reexec_asked_for_during_a_validation_waits_for_the_restart(
    envoy_family: EnvoyFamily,
) -> None:
    slow = envoy_family.root.parent / f"{envoy_family.root.name}.slow"
    validating = envoy_family.root.parent / f"{envoy_family.root.name}.validating"
    wrapper = envoy_family.root.parent / f"{envoy_family.root.name}.envoy-wrapper"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--mode" ] && [ -e {slow} ]; then touch {validating}; sleep 2; fi\n'
        f'exec {ENVOY_BIN} "$@"\n'
    )
    wrapper.chmod(0o755)
    daemon = envoy_family.start("--envoy", str(wrapper), *envoy_family.watched())
    daemon.wait_event("child.serving", epoch=0)
    slow.touch()
    envoy_family.write_config("v1")
    daemon.signal(signal.SIGHUP)
    wait_until(validating.exists, timeout_s=15, what="the slow validation to begin")
    daemon.signal(signal.SIGUSR2)

    adopted = _reexeced(daemon)
    assert adopted["epochs"][-1] == 1, adopted  # epoch 0 may still drain
    requested = daemon.wait_event("reexec.requested", reason="SIGUSR2")
    passed = daemon.wait_event("validation.passed", count=2)  # the first: at start
    serving = daemon.wait_event("child.serving", epoch=1)
    exec_event = daemon.wait_event("daemon.reexec")
    assert requested["line"] < passed["line"], "SIGUSR2 did not arrive during the validation"
    assert serving["line"] < exec_event["line"] < adopted["line"]
    assert serving["pid"] in adopted["pids"], (serving, adopted)
    _serves(envoy_family, "v1")
    # The restart was performed once, by the old image; the new one started nothing.
    assert len(daemon.events("child.started", epoch=1)) == 1
    assert not daemon.events("child.started", epoch=2)
    assert not daemon.events("reexec.refused")
    _stop_cleanly(daemon)


def _wait_line(daemon: Daemon, needle: str, timeout_s: float = 30.0) -> None:
    """As fast as we can read the log (a 2 ms poll): the exec window is ~0.2 s."""
    deadline = time.monotonic() + timeout_s
    while needle not in daemon.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no {needle!r} in the log"
        time.sleep(0.002)


def test_a_sighup_in_the_exec_window_is_handled_once_by_the_new_image(
    envoy_family: EnvoyFamily,
) -> None:
    daemon = envoy_family.start(*envoy_family.watched())
    daemon.wait_event("child.serving", epoch=0)
    # No file change: the SIGHUP alone asks for a restart (of the same content).
    daemon.signal(signal.SIGUSR2)
    _wait_line(daemon, '"daemon.reexec"')
    daemon.signal(signal.SIGHUP)
    log = daemon.log_path.read_text(errors="replace")
    before_new_image = ADOPTED_MESSAGE not in log  # the new image had not logged a line
    before_adopted = '"daemon.adopted"' not in log

    adopted = _reexeced(daemon)
    assert adopted["epochs"] == [0], adopted
    request = daemon.wait_event("restart.requested", reason="SIGHUP")
    daemon.wait_event("child.serving", epoch=1)
    _serves(envoy_family, "v0")
    daemon.wait_event("child.exited", epoch=0)
    # Exactly one restart, by the new image: the SIGHUP was neither lost nor doubled.
    assert request["line"] > adopted["line"], (request, adopted)
    assert len(daemon.events("restart.requested")) == 1, daemon.events("restart.requested")
    assert len(daemon.events("child.started", epoch=1)) == 1
    assert not daemon.events("child.started", epoch=2)
    assert daemon.process.poll() is None
    if not before_new_image:  # not asserted: a descheduled test can miss the ~0.2 s window
        warnings.warn(
            f"the SIGHUP missed the exec window (before daemon.adopted: {before_adopted})",
            stacklevel=1,
        )
    _stop_cleanly(daemon)


def test_ctl_reexec_answers_from_the_new_image_and_status_still_answers(
    envoy_family: EnvoyFamily,
) -> None:
    port = free_port()
    daemon = envoy_family.start(*envoy_family.watched(), "--status-address", f"127.0.0.1:{port}")
    serving = daemon.wait_event("child.serving", epoch=0)
    assert http_get(port, "/healthz") == (200, "serving\n")
    sock = daemon.log_path.with_suffix(".sock")
    control_inode, status_inode = sock.stat().st_ino, _listening_inode(port)
    result = _ctl(daemon, "reexec")
    assert result.returncode == 0, (result.stdout, result.stderr)
    version = _first_version(daemon)
    assert f"re-executed: envoy-autoreload {version} took over from {version}" in result.stdout
    adopted = _reexeced(daemon, timeout_s=5)  # logged before the answer was sent
    assert adopted["pids"] == [serving["pid"]]
    assert daemon.wait_event("reexec.requested")["reason"] == "control"
    # The control socket and the status listener were inherited, not reopened.
    status = _status(daemon)
    assert status["serving"]["pid"] == serving["pid"], status
    assert http_get(port, "/healthz") == (200, "serving\n")
    assert sock.stat().st_ino == control_inode, "the control socket was bound anew"
    assert _listening_inode(port) == status_inode, "the status listener was opened anew"
    assert envoy_family.body() == "v0"
    _stop_cleanly(daemon)


def _listening_inode(port: int) -> int:
    """The socket inode listening on 127.0.0.1:port (/proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
            return int(fields[9])
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def _set_version(package: Path, version: str) -> None:
    init = package / "__init__.py"
    lines = init.read_text().splitlines()
    marked = [
        f'__version__ = "{version}"' if ln.startswith("__version__ =") else ln for ln in lines
    ]
    assert sum(ln != m for ln, m in zip(lines, marked, strict=True)) <= 1, "one __version__"
    assert f'__version__ = "{version}"' in marked, lines
    init.write_text("\n".join(marked) + "\n")


def test_a_broken_new_image_is_refused_and_a_repaired_one_takes_effect(
    envoy_family: EnvoyFamily, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The daemon runs from a copy of the package (outside the watched directory), which
    # the test then "upgrades": first broken, then fixed with a new version.
    site = tmp_path_factory.mktemp("site")
    copy = site / "envoy_autoreload"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    _set_version(copy, "0.1.0+test1")
    # PYTHONSAFEPATH: `-m` would put the working directory (the repository) first.
    env = {"PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"}
    daemon = envoy_family.start(*envoy_family.watched(), env=env)
    serving = daemon.wait_event("child.serving", epoch=0)
    assert daemon.events("daemon.started")[0]["version"] == "0.1.0+test1"

    cli = copy / "cli.py"
    good_cli = cli.read_text()
    cli.write_text(good_cli + "\ndef broken(:\n")
    refused = _ctl(daemon, "reexec")
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    assert "refused" in refused.stderr, refused.stderr
    event = daemon.wait_event("reexec.refused")
    message = str(event["message"])
    assert "\n" not in message and "Traceback" not in message, message
    assert "self-test failed: SyntaxError" in message and "carries on" in message, message
    assert not daemon.events("daemon.reexec")
    started = daemon.events("daemon.started")
    assert len(started) == 1 and started[0]["pid"] == daemon.pid, started
    assert daemon.process.poll() is None
    assert envoy_family.body() == "v0"
    assert _parent_of(serving["pid"]) == daemon.pid

    envoy_family.write_config("v1")  # the old image still applies changes
    changed = daemon.wait_event("child.serving", epoch=1)
    _serves(envoy_family, "v1")
    daemon.wait_event("child.exited", epoch=0)

    cli.write_text(good_cli)
    _set_version(copy, "0.1.0+test2")
    upgraded = _ctl(daemon, "reexec")
    assert upgraded.returncode == 0, (upgraded.stdout, upgraded.stderr)
    assert (
        "re-executed: envoy-autoreload 0.1.0+test2 took over from 0.1.0+test1" in upgraded.stdout
    ), upgraded.stdout
    adopted = _reexeced(daemon, timeout_s=5)
    assert adopted["version"] == "0.1.0+test2", adopted
    assert adopted["epochs"] == [1] and adopted["pids"] == [changed["pid"]], adopted
    assert daemon.events("daemon.started")[1]["version"] == "0.1.0+test2"
    assert envoy_family.body() == "v1"
    _stop_cleanly(daemon)
