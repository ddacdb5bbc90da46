"""Fault matrix, processes and signals: Envoys killed, start scripts broken after start-up,
signal floods, a stop in the middle of a restart, and the daemon itself killed.

Each row runs the real Envoy with a request every 100 ms and checks what users rely on:
nobody saw an error where nothing had to fail, and an outage is as short as it can be
where one cannot be avoided. The rows are the README's "What happens when" table.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.daemon import assert_one_clear_line
from tests.envoy.conftest import EnvoyFamily, slow_to_initialize
from tests.envoy.probe import ServingProbe
from tests.helpers import free_port, holds_for, wait_until


def report(request: pytest.FixtureRequest, name: str, value: float) -> None:
    """A measured figure, kept in the test's report (`--junitxml` shows user properties)."""
    request.node.user_properties.append((name, round(value, 3)))


def test_a_killed_serving_envoy_comes_back_at_epoch_0_and_a_crash_loop_exits_1(
    envoy_family: EnvoyFamily, request: pytest.FixtureRequest
) -> None:
    daemon = envoy_family.start()
    daemon.wait_event("child.serving", epoch=0)
    with ServingProbe(envoy_family.listener_port) as probe:
        for count in range(1, 6):
            serving = daemon.wait_event("child.serving", epoch=0, count=count, timeout_s=30)
            if count == 2:
                probe.wait_for_body("v0")
                first_outage = probe.outages()
            os.kill(int(serving["pid"]), signal.SIGKILL)
            died = daemon.wait_event("child.died", pid=serving["pid"])
            assert_one_clear_line(died, "the serving Envoy died (killed by SIGKILL)")
        assert daemon.wait_exit() == 1
    # The first death is met at once; an Envoy that keeps dying is a crash loop.
    delays = [e["in_s"] for e in daemon.events("restart.recovery_scheduled")]
    assert delays == [0.0, 1.0, 2.0, 4.0]
    assert [e["reason"] for e in daemon.events("child.started")] == ["startup"] + 4 * ["recovery"]
    exhausted = daemon.wait_event("daemon.crash_budget_exhausted")
    assert_one_clear_line(exhausted, "5 failures within 300 s")
    assert not envoy_family.our_processes()
    # Often shorter than the probe's 100 ms: then no request failed at all.
    worst = max((o.duration_s or 99.0 for o in first_outage), default=0.0)
    assert len(first_outage) <= 1 and worst < 2.0, first_outage
    report(request, "first_outage_s", worst)


def test_a_draining_envoy_killed_early_dooms_its_successor_and_the_outage_is_short(
    envoy_family: EnvoyFamily, request: pytest.FixtureRequest
) -> None:
    # A kill counts as early only before Envoy would end the drain itself: 4 s leaves
    # a loaded test box time to deliver it.
    envoy_family.write_script(parent_shutdown_s=4)
    daemon = envoy_family.start()
    parent = daemon.wait_event("child.serving", epoch=0)
    with ServingProbe(envoy_family.listener_port) as probe:
        envoy_family.write_config("v1")
        daemon.signal(signal.SIGHUP)
        doomed = daemon.wait_event("child.serving", epoch=1)
        live_at = time.monotonic()
        os.kill(int(parent["pid"]), signal.SIGKILL)
        cut = daemon.wait_event("child.drain_cut", epoch=0)
        assert cut["level"] == "error"
        assert_one_clear_line(cut, "will abort about 10 s after its parent-shutdown time")
        probe.wait_for_body("v1")  # the doomed epoch still serves until Envoy aborts it
        # Envoy aborts it about parent-shutdown (4 s) + 10 s after it went LIVE (§6).
        died = daemon.wait_event("child.died", pid=doomed["pid"], timeout_s=60)
        assert 10.0 < time.monotonic() - live_at < 25.0
        assert died["level"] == "error" and died["status"] == "killed by SIGABRT"
        daemon.wait_event("child.serving", epoch=0, count=2)
        probe.wait_for_body("v1")
    outages = probe.outages()
    assert len(outages) <= 1, outages
    # Epoch 0 is started the moment the doomed one is reaped: 70 ms (bench/outage.py).
    worst = max((o.duration_s or 99.0 for o in outages), default=0.0)
    assert worst < 1.5, outages
    report(request, "outage_s", worst)


@pytest.mark.parametrize("mistake", ["deleted", "not_executable", "exits_127"])
def test_a_start_script_broken_after_start_up_is_a_failed_start(
    envoy_family: EnvoyFamily, mistake: str
) -> None:
    daemon = envoy_family.start()
    daemon.wait_event("child.serving", epoch=0)
    good_script = envoy_family.script.read_text()
    with ServingProbe(envoy_family.listener_port) as probe:
        match mistake:
            case "deleted":
                envoy_family.script.unlink()
                says = "No such file or directory"
            case "not_executable":
                envoy_family.script.chmod(0o644)
                says = "Permission denied"
            case _:
                envoy_family.write_script(prelude="exec /nonexistent/envoy\n")
                says = "not found"
        daemon.signal(signal.SIGHUP)
        failed = daemon.wait_event("restart.failed", epoch=1)
        assert_one_clear_line(failed, says, "epoch 0 keeps serving")
        envoy_family.script.write_text(good_script)
        envoy_family.script.chmod(0o755)
        envoy_family.write_config("v1")
        daemon.signal(signal.SIGHUP)
        daemon.wait_event("child.serving", epoch=1)
        probe.wait_for_body("v1")
    probe.assert_never_failed()


def test_a_flood_of_1000_sighups_and_1000_sigusr1s_is_a_few_restarts(
    envoy_family: EnvoyFamily,
) -> None:
    daemon = envoy_family.start()
    daemon.wait_event("child.serving", epoch=0)
    with ServingProbe(envoy_family.listener_port) as probe:
        envoy_family.write_config("v1")
        began = time.monotonic()
        for i in range(1000):
            daemon.signal(signal.SIGHUP)
            daemon.signal(signal.SIGUSR1)
            # Paced to 2 s: the flood must not just be one kernel-coalesced signal.
            time.sleep(max(0.0, began + i * 0.002 - time.monotonic()))
        assert time.monotonic() - began < 4.0
        daemon.wait_event("child.serving", epoch=1)
        probe.wait_for_body("v1")
        # Requests queued behind epoch 1 run as one restart once epoch 0 has drained.
        daemon.wait_event("child.exited", epoch=0)
        wait_until(
            lambda: len(daemon.events("child.started")) == len(daemon.events("child.serving")),
            timeout_s=30,
            what="every started epoch serving",
        )
        # Past a queued restart's drain wait (2 s parent-shutdown): nothing more comes.
        count = len(daemon.events("child.started"))
        holds_for(
            lambda: len(daemon.events("child.started")) == count,
            duration_s=4.0,
            what="no further restart",
        )
    probe.assert_never_failed()
    assert daemon.process.poll() is None
    started = [e["epoch"] for e in daemon.events("child.started")]
    # One restart, then one per drain the flood outlasted (2 s each).
    assert started in ([0, 1], [0, 1, 2], [0, 1, 2, 3]), started
    assert not daemon.events("restart.failed")
    assert daemon.events("signal.forwarded", signal="SIGUSR1")


def test_sigterm_while_a_restart_is_starting_stops_every_envoy_cleanly(
    envoy_family: EnvoyFamily,
) -> None:
    daemon = envoy_family.start("--config", str(envoy_family.config))
    serving = daemon.wait_event("child.serving", epoch=0)
    envoy_family.write_raw(slow_to_initialize(envoy_family.render("v1"), free_port()))
    daemon.signal(signal.SIGHUP)
    starting = daemon.wait_event("child.started", epoch=1)

    def initializing() -> bool:
        info = envoy_family.server_info()  # the child answers admin while it starts (§15)
        return info is not None and info["state"] == "PRE_INITIALIZING"

    wait_until(initializing, timeout_s=10, what="epoch 1 initializing")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    exits = {e["pid"]: e["status"] for e in daemon.events("child.exited")}
    assert exits == {serving["pid"]: "exit status 0", starting["pid"]: "exit status 0"}
    assert daemon.wait_event("shutdown.finished")["exit_code"] == 0
    assert not envoy_family.our_processes()
    assert not envoy_family.shm.exists()


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.parametrize("script", ["execs_envoy", "forgets_exec", "still_preparing"])
def test_the_daemon_killed_leaves_no_envoy_holding_the_ports(
    envoy_family: EnvoyFamily, script: str
) -> None:
    text = envoy_family.script.read_text()
    if script == "forgets_exec":
        envoy_family.script.write_text(text.replace("exec ", "", 1))
    elif script == "still_preparing":
        # Epoch 1's script is still at work (a slow template step) when the daemon dies.
        envoy_family.write_script(prelude='[ "$RESTART_EPOCH" = 1 ] && sleep 3\n')
    daemon = envoy_family.start()
    daemon.wait_event("child.serving", epoch=0)
    daemon.signal(signal.SIGHUP)
    if script == "still_preparing":
        daemon.wait_event("child.started", epoch=1)
    else:
        daemon.wait_event("child.serving", epoch=1)
        assert len(envoy_family.our_processes()) == 2, "one serving, one draining"
    started = [int(e["pid"]) for e in daemon.events("child.started")]
    daemon.process.kill()
    daemon.process.wait(timeout=10)
    # Envoy asks the kernel for SIGTERM when its parent dies (ENVOY_FACTS §11); the daemon
    # asks the same for the start script, so a script that has not exec'd yet dies too.
    wait_until(lambda: not envoy_family.our_processes(), timeout_s=15, what="no Envoy left")
    wait_until(
        lambda: not [pid for pid in started if Path(f"/proc/{pid}").exists()],
        timeout_s=5,  # well before a parent-less Envoy would abort by itself (~10 s)
        what="no start script left",
    )
    holds_for(
        lambda: not envoy_family.our_processes(),
        duration_s=4.0,
        what="no Envoy started by an orphaned script",
    )
    assert _port_is_free(envoy_family.listener_port)
    assert _port_is_free(envoy_family.admin_port)
