"""The spawn made ahead (`standby.py`, issue 16) against the real Envoy: once an epoch
is LIVE the daemon holds a standby shell, the next restart's Envoy runs in that very
process, and a standby never outlives its image of the daemon (re-exec, SIGTERM)."""

from __future__ import annotations

import signal
from pathlib import Path

from envoy_autoreload.standby import NAME
from tests.daemon import Daemon
from tests.envoy.conftest import EnvoyFamily
from tests.helpers import children_of, exited, wait_until


def _standbys(daemon: Daemon, script: Path) -> list[int]:
    found = []
    for pid in children_of(daemon.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # Its $0, and the start script it is to exec (the survey forked just before
        # the first one execs `cat` instead).
        if argv[3:5] == [NAME.encode(), bytes(script)]:
            found.append(pid)
    return found


def _one_standby(daemon: Daemon, script: Path, besides: int | None = None) -> int:
    def ready() -> int | None:
        found = [pid for pid in _standbys(daemon, script) if pid != besides]
        return found[0] if len(found) == 1 else None

    return wait_until(ready, timeout_s=30, what="one standby beside the serving Envoy")


def _environ(pid: int) -> dict[bytes, bytes]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split(b"=", 1) for entry in raw.split(b"\0") if entry)


def test_the_next_epoch_runs_in_the_standby_and_none_outlives_its_image(
    envoy_family: EnvoyFamily,
) -> None:
    daemon = envoy_family.start(*envoy_family.watched())
    daemon.wait_event("child.serving", epoch=0)
    standby = _one_standby(daemon, envoy_family.script)

    envoy_family.write_config("v1")
    serving = daemon.wait_event("child.serving", epoch=1)
    assert serving["pid"] == standby, "epoch 1 was spawned another way"
    # Its check ahead passed within the debounce: fired at the deadline (ready_start.py).
    assert daemon.wait_event("child.started", epoch=1).get("ahead") is True
    assert _environ(standby)[b"RESTART_EPOCH"] == b"1"
    assert envoy_family.body() == "v1"
    following = _one_standby(daemon, envoy_family.script, besides=standby)

    daemon.signal(signal.SIGUSR2)
    daemon.wait_event("daemon.adopted")
    wait_until(lambda: exited(following), timeout_s=10, what="the old image's standby gone")
    assert _standbys(daemon, envoy_family.script) == [], "a standby of the old image was left"

    envoy_family.write_config("v2")
    daemon.wait_event("child.serving", epoch=2)
    assert envoy_family.body() == "v2"
    last = _one_standby(daemon, envoy_family.script)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    assert exited(last)
