"""Races between recovery, validation and retries (found in review, each reproduced)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.envoy.conftest import ENVOY_BIN, EnvoyFamily


def _slow_validator(family: EnvoyFamily, marker: Path, seconds: int) -> Path:
    wrapper = family.root / "envoy-wrapper"
    wrapper.write_text(
        f'#!/bin/sh\n[ "$1" = "--mode" ] && [ -e {marker} ] && sleep {seconds}\n'
        f'exec {ENVOY_BIN} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def test_a_validation_that_ends_while_nothing_serves_does_not_stall_recovery(
    envoy_family: EnvoyFamily,
) -> None:
    slow = envoy_family.root / "slow"
    failures = envoy_family.root / "failures-left"
    failures.write_text("0")
    envoy_family.write_script(
        prelude=f'n=$(cat {failures}); [ "$n" -gt 0 ] && echo $((n-1)) > {failures} && exit 1\n'
    )
    wrapper = _slow_validator(envoy_family, slow, 2)
    daemon = envoy_family.start("--envoy", str(wrapper), "--config", str(envoy_family.config))
    first = daemon.wait_event("child.serving", epoch=0)
    slow.touch()
    envoy_family.write_config("v1")
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("restart.requested", reason="SIGHUP")
    # Two failed cold starts: the second backoff (2 s) is running when the 2 s
    # validation passes. Recovery must go on, and then the request must be carried out.
    failures.write_text("2")
    os.kill(int(first["pid"]), signal.SIGKILL)
    daemon.wait_event("restart.recovery_scheduled", in_s=2.0)
    daemon.wait_event("validation.passed", count=2)  # start-up, then the SIGHUP's
    daemon.wait_event("child.serving", epoch=0, count=2, timeout_s=60)
    slow.unlink()
    daemon.wait_event("child.serving", epoch=1, timeout_s=60)
    assert envoy_family.body() == "v1"


def test_a_doomed_epoch_is_not_stopped_for_a_broken_push(envoy_family: EnvoyFamily) -> None:
    daemon = envoy_family.start(
        "--watch", str(envoy_family.root), "--config", str(envoy_family.config)
    )
    parent = daemon.wait_event("child.serving", epoch=0)
    envoy_family.write_config("v1")
    doomed = daemon.wait_event("child.serving", epoch=1)
    os.kill(int(parent["pid"]), signal.SIGKILL)
    daemon.wait_event("child.drain_cut", epoch=0)
    envoy_family.write_raw("admin: [broken\n")
    daemon.wait_event("validation.failed")
    assert not daemon.events("restart.full"), "a broken push must not stop a serving Envoy"
    assert Path(f"/proc/{doomed['pid']}").exists() and envoy_family.body() == "v1"
    envoy_family.write_config("v2")  # a good push is carried out as a full restart
    daemon.wait_event("restart.full", epoch=1)
    daemon.wait_event("child.serving", epoch=0, count=2)
    assert envoy_family.body() == "v2"


def test_a_change_during_a_retry_backoff_is_validated_before_any_start(
    envoy_family: EnvoyFamily,
) -> None:
    import socket

    # A long debounce: the broken write below is still unsettled when the retry is due.
    daemon = envoy_family.start(
        "--watch",
        str(envoy_family.root),
        "--config",
        str(envoy_family.config),
        "--debounce",
        "4",
        "--debounce-max",
        "4",
    )
    daemon.wait_event("child.serving", epoch=0)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        envoy_family.write_config("v1", extra_listener_port=blocker.getsockname()[1])
        scheduled = daemon.wait_event("restart.retry_scheduled", epoch=1, timeout_s=60)
        envoy_family.write_raw("admin: [broken\n")  # during the 1 s backoff
        failed = daemon.wait_event("validation.failed", timeout_s=60)
    retried = [e for e in daemon.events("child.started") if e["line"] > scheduled["line"]]
    assert not retried, "the retry never starts content that was not validated"
    assert failed["line"] > scheduled["line"]
    assert envoy_family.body() == "v0"
    envoy_family.write_config("v2")
    daemon.wait_event("child.serving", epoch=1, timeout_s=60)
    assert envoy_family.body() == "v2"
