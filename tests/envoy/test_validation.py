"""The validation gate and binary checks, against the real Envoy."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.daemon import one_error_line, run_cli
from tests.envoy.breakages import unknown_cluster
from tests.envoy.conftest import ENVOY_BIN, EnvoyFamily
from tests.helpers import daemon_children, wait_until


def _fake_envoy(path: Path, body: str) -> Path:
    path.write_text(f'#!/bin/sh\n{body}\nexec {ENVOY_BIN} "$@"\n')
    path.chmod(0o755)
    return path


def test_a_validator_that_hangs_times_out_cleanly(envoy_family: EnvoyFamily) -> None:
    marker = envoy_family.root / "hang"
    fake = _fake_envoy(
        envoy_family.root / "envoy-wrapper",
        f'[ "$1" = "--mode" ] && [ -e {marker} ] && exec sleep 600',
    )
    daemon = envoy_family.start(
        "--envoy", str(fake), "--config", str(envoy_family.config), "--validate-timeout", "1"
    )
    serving = daemon.wait_event("child.serving", epoch=0)
    marker.touch()
    daemon.signal(signal.SIGHUP)
    failed = daemon.wait_event("validation.failed")
    assert "timed out after 1 s" in failed["message"]
    assert envoy_family.body() == "v0"
    assert daemon_children(daemon.pid) == [serving["pid"]], "the hung validator was reaped"
    marker.unlink()
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("child.serving", epoch=1)


def _swap_binary(target: Path, body: str) -> None:
    """A package upgrade: the new file is written aside, then renamed over the old."""
    staged = target.with_name(f".{target.name}.dpkg-new")
    _fake_envoy(staged, body)
    os.rename(staged, target)


INCOMPATIBLE = '[ "$1" = "--hot-restart-version" ] && printf 12.200 >&2 && exit 0'


def test_an_incompatible_binary_upgrade_is_refused_without_touching_envoy(
    envoy_family: EnvoyFamily, tmp_path: Path
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = _fake_envoy(bindir / "envoy", "")
    daemon = envoy_family.start(*envoy_family.watched("--envoy", str(wrapper)))
    serving = daemon.wait_event("child.serving", epoch=0)
    _swap_binary(wrapper, INCOMPATIBLE)
    refused = daemon.wait_event("binary.incompatible")
    assert "12.200" in refused["message"] and "11.104" in refused["message"]
    assert "restart the service" in refused["message"]
    assert envoy_family.body() == "v0"
    assert Path(f"/proc/{serving['pid']}").exists()
    assert not daemon.events("child.started", epoch=1)
    _swap_binary(wrapper, "# 1.40.1")  # positive control: a compatible upgrade hot restarts
    daemon.wait_event("child.serving", epoch=1)


def test_an_incompatible_binary_can_be_taken_with_a_full_restart(
    envoy_family: EnvoyFamily, tmp_path: Path
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = _fake_envoy(bindir / "envoy", "")
    daemon = envoy_family.start(
        *envoy_family.watched("--envoy", str(wrapper), "--on-incompatible-binary", "restart")
    )
    first = daemon.wait_event("child.serving", epoch=0)
    _swap_binary(wrapper, INCOMPATIBLE)
    daemon.wait_event("restart.full")
    second = daemon.wait_event("child.serving", epoch=0, count=2)
    assert second["pid"] != first["pid"]
    assert envoy_family.body() == "v0"


def test_a_binary_that_is_not_envoy_is_refused(envoy_family: EnvoyFamily, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = _fake_envoy(bindir / "envoy", "")
    daemon = envoy_family.start(*envoy_family.watched("--envoy", str(wrapper)))
    daemon.wait_event("child.serving", epoch=0)
    _swap_binary(wrapper, "echo 'hello, I am not a proxy'; exit 0")
    refused = daemon.wait_event("binary.refused")
    assert refused["message"] == (
        f"{wrapper} is not Envoy: '--version' printed no Envoy version; not restarting onto "
        "it; epoch 0 keeps serving"
    )
    assert envoy_family.body() == "v0"
    assert not daemon.events("child.started", epoch=1)


def test_startup_errors_exit_with_their_code_and_one_line(
    envoy_family: EnvoyFamily, tmp_path: Path
) -> None:
    script, config = str(envoy_family.script), str(envoy_family.config)
    result = run_cli(["--envoy", str(tmp_path / "nope"), "--config", config, script])
    assert result.returncode == 2 and "nope not found" in one_error_line(result.stderr)

    result = run_cli(
        ["--envoy", str(ENVOY_BIN), "--config", str(tmp_path / "missing.yaml"), script]
    )
    assert result.returncode == 2 and "missing.yaml does not exist" in one_error_line(result.stderr)

    envoy_family.write_raw(unknown_cluster(envoy_family.config.read_text()))
    result = run_cli(["--envoy", str(ENVOY_BIN), "--config", config, script])
    assert result.returncode == 3
    line = one_error_line(result.stderr)
    assert "does not validate" in line and "unknown cluster 'nosuch'" in line
    assert envoy_family.body() is None, "Envoy was never started"
    wait_until(lambda: not envoy_family.our_processes(), timeout_s=10, what="no Envoy")


def test_sigterm_while_validating_stops_in_order(envoy_family: EnvoyFamily) -> None:
    marker = envoy_family.root / "slow"
    fake = _fake_envoy(
        envoy_family.root / "envoy-wrapper",
        f'[ "$1" = "--mode" ] && [ -e {marker} ] && exec sleep 600',
    )
    daemon = envoy_family.start("--envoy", str(fake), "--config", str(envoy_family.config))
    serving = daemon.wait_event("child.serving", epoch=0)
    marker.touch()
    daemon.signal(signal.SIGHUP)
    wait_until(
        lambda: len(daemon_children(daemon.pid)) == 2,
        timeout_s=10,
        what="the validator running beside Envoy",
    )
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    exited = daemon.events("child.exited", pid=serving["pid"])
    assert exited and exited[0]["status"] == "exit status 0", "TERMed in order, not KILLed"
    assert not any("Traceback" in line for line in daemon.lines())


def test_a_burst_that_settles_during_validation_is_not_a_second_restart(
    envoy_family: EnvoyFamily,
) -> None:
    marker = envoy_family.root / "slow"
    fake = _fake_envoy(
        envoy_family.root / "envoy-wrapper",
        f'[ "$1" = "--mode" ] && [ -e {marker} ] && sleep 2',
    )
    data = envoy_family.root / "data"
    data.mkdir()
    daemon = envoy_family.start(
        "--envoy",
        str(fake),
        "--watch",
        str(data),
        "--config",
        str(envoy_family.config),
        "--no-watch-binary",
        "--log-level",
        "debug",
    )
    daemon.wait_event("child.serving", epoch=0)
    marker.touch()
    envoy_family.write_config("v1")
    daemon.wait_event("restart.requested", reason="files_changed")
    # While it validates, the same bytes are written again (a config push re-run).
    envoy_family.write_config("v1")
    daemon.wait_event("restart.skipped", reason="unchanged")
    daemon.wait_event("child.serving", epoch=1)
    daemon.wait_event("child.exited", epoch=0)  # past any queued second restart
    assert len(daemon.events("child.started")) == 2
    assert envoy_family.body() == "v1"
