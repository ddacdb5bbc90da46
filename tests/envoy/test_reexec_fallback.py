"""When the new image cannot read the hand-over, it adopts what /proc shows rather than
cold-starting over a serving Envoy (issue "re-exec in place", the fault path)."""

from __future__ import annotations

import os
import signal
import time

from envoy_autoreload.child import ScriptSpawner
from envoy_autoreload.proc_adoption import Listeners, handover_from_proc
from tests.daemon import start_daemon
from tests.envoy.conftest import EnvoyFamily
from tests.helpers import wait_until

# The daemon, with a hand-over that arrives cut short: the new image cannot parse it.
TRUNCATE_THE_HANDOVER = """\
import os, sys
from envoy_autoreload import handover, reexec
original = handover.write_memfd
def truncated(document):
    fd = original(document)
    os.ftruncate(fd, 10)
    return fd
reexec.write_memfd = truncated
from envoy_autoreload.cli import cli
cli.main(args=sys.argv[1:], prog_name="envoy-autoreload")
"""


def test_what_proc_shows_is_adopted_when_the_handover_is_unreadable(
    envoy_family: EnvoyFamily,
) -> None:
    log = envoy_family.root.parent / "truncated.daemon.log"
    daemon = start_daemon(
        [*envoy_family.watched("--health-window", "0"), str(envoy_family.script)],
        log,
        entry=("-c", TRUNCATE_THE_HANDOVER),
    )
    envoy_family.daemons.append(daemon)
    serving = daemon.wait_event("child.serving", epoch=0)
    daemon.signal(signal.SIGUSR2)
    failed = daemon.wait_event("daemon.adoption_failed")
    assert "adopting the Envoys /proc shows" in failed["message"], failed["message"]
    adopted = daemon.wait_event("daemon.adopted")
    assert adopted["pids"] == [serving["pid"]] and adopted["epochs"] == [0]
    assert not daemon.events("child.started")[1:], "a cold start over the serving Envoy"
    envoy_family.write_config("v1")  # and it carries on supervising
    daemon.wait_event("child.serving", epoch=1)
    wait_until(lambda: envoy_family.body() == "v1", timeout_s=30, what="v1 served")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0


def test_handover_from_proc_finds_our_envoy_and_its_stderr_pipe(
    envoy_family: EnvoyFamily,
) -> None:
    """Here the test process is the parent: the Envoy it started is found by epoch,
    with the read end of its stderr pipe among our descriptors."""
    child = ScriptSpawner(envoy_family.script, ()).spawn(0)
    try:
        wait_until(
            lambda: (info := envoy_family.server_info()) is not None and info["state"] == "LIVE",
            timeout_s=30,
            what="Envoy LIVE",
        )
        rebuilt = handover_from_proc(os.getpid(), time.monotonic(), Listeners(None, None))
        assert rebuilt is not None
        (record,) = rebuilt.generations
        assert (record.pid, record.epoch, record.state) == (child.pid, 0, "serving")
        assert record.stderr_fd == child.stderr_fd()
    finally:
        child.kill()
        child.wait(10)
        child.close_stderr()


# The daemon, with a SIGHUP that its handler takes in just before the exec: recorded in
# the reactor, not yet handled when the image is replaced.
SIGHUP_TAKEN_IN_BEFORE_THE_EXEC = """\
import os, signal, sys, time
from envoy_autoreload import reexec
original = reexec.Reexec.exec_now
def exec_now(self, handover, inherit):
    os.kill(os.getpid(), signal.SIGHUP)
    time.sleep(0.05)  # the Python-level handler runs: the reactor has it pending
    original(self, handover, inherit)
reexec.Reexec.exec_now = exec_now
from envoy_autoreload.cli import cli
cli.main(args=sys.argv[1:], prog_name="envoy-autoreload")
"""


def test_a_signal_taken_in_but_not_handled_before_the_exec_reaches_the_new_image(
    envoy_family: EnvoyFamily,
) -> None:
    log = envoy_family.root.parent / "pending.daemon.log"
    daemon = start_daemon(
        [*envoy_family.watched("--health-window", "0"), str(envoy_family.script)],
        log,
        entry=("-c", SIGHUP_TAKEN_IN_BEFORE_THE_EXEC),
    )
    envoy_family.daemons.append(daemon)
    daemon.wait_event("child.serving", epoch=0)
    daemon.signal(signal.SIGUSR2)
    adopted = daemon.wait_event("daemon.adopted")
    request = daemon.wait_event("restart.requested", reason="SIGHUP")
    assert request["line"] > adopted["line"], "handled by the new image"
    daemon.wait_event("child.serving", epoch=1)
    assert len(daemon.events("restart.requested", reason="SIGHUP")) == 1
