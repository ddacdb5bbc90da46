"""The health prober against the real Envoy's admin: the epoch, LIVE, and the
listener-failure counter as Envoy writes them (ENVOY_FACTS §15), and a hot-restarted
child that is still PRE_INITIALIZING."""

from __future__ import annotations

import select
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from envoy_autoreload.addresses import AdminAddress
from envoy_autoreload.health import ROUND_STATS_PATH, HealthObservation, HealthProber, UrlResult
from tests.envoy.conftest import ENVOY_BIN, EnvoyFamily, slow_to_initialize
from tests.helpers import free_port, http_get, wait_until

if TYPE_CHECKING:
    from envoy_autoreload.roster import Generation


@dataclass(frozen=True)
class FakeGen:
    epoch: int
    pid: int


def _start_envoy(
    family: EnvoyFamily, log: Path, epoch: int = 0, config: Path | None = None
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                str(ENVOY_BIN),
                *("-c", str(config or family.config), "--restart-epoch", str(epoch)),
                *("--base-id", str(family.base_id), "--log-level", "warning"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _stop(*envoys: subprocess.Popen[bytes]) -> None:
    for envoy in envoys:
        envoy.terminate()
    for envoy in envoys:
        try:
            envoy.wait(10)
        except subprocess.TimeoutExpired:
            envoy.kill()
            envoy.wait()


def test_a_round_against_a_live_envoy(envoy_family: EnvoyFamily) -> None:
    envoy = _start_envoy(envoy_family, envoy_family.root / "envoy.log")
    prober = HealthProber(
        (f"http://127.0.0.1:{envoy_family.listener_port}/",),
        lambda _gen: AdminAddress("127.0.0.1", envoy_family.admin_port),
    )
    try:
        wait_until(
            lambda: (envoy_family.server_info() or {}).get("state") == "LIVE",
            timeout_s=20,
            what="Envoy to be LIVE",
        )
        filtered = http_get(envoy_family.admin_port, ROUND_STATS_PATH)
        assert filtered == (200, "server.hot_restart_epoch: 0\n"), (
            "admin applies the (percent-encoded) filter, answers in the text format, and "
            "leaves out the counter never incremented (`usedonly`), not the gauge set to 0"
        )
        unfiltered = http_get(envoy_family.admin_port, "/stats?type=Counters")
        assert unfiltered is not None
        assert "listener_manager.listener_create_failure: 0\n" in unfiltered[1]
        prober.begin_round(cast("Generation", FakeGen(0, envoy.pid)))
        readable, _, _ = select.select([prober], [], [], 10)
        assert readable, "no observation within 10 s"
        observation = prober.take()
    finally:
        prober.close()
        _stop(envoy)
        envoy_family.shm.unlink(missing_ok=True)
    assert observation is not None
    assert (observation.admin_state, observation.admin_epoch) == ("LIVE", 0)
    assert observation.listener_create_failures == 0
    assert observation.urls == (
        UrlResult(f"http://127.0.0.1:{envoy_family.listener_port}/", True, "HTTP 200"),
    )


def test_a_round_while_the_new_epoch_is_still_pre_initializing(
    envoy_family: EnvoyFamily,
) -> None:
    """Fresh connections reach the child ~60 ms after it starts (§15), and its stats say
    `server.state: 0` (LIVE) while `/ready` says PRE_INITIALIZING: the round must say
    what `/ready` says, and the child's own epoch."""
    envoy_family.write_config("v0")
    parent = _start_envoy(envoy_family, envoy_family.root / "envoy-0.log")
    slow = envoy_family.root / "slow.yaml"
    slow.write_text(slow_to_initialize(envoy_family.render("v1"), free_port()))
    children: list[subprocess.Popen[bytes]] = []
    prober = HealthProber((), lambda _gen: AdminAddress("127.0.0.1", envoy_family.admin_port))
    try:
        wait_until(
            lambda: http_get(envoy_family.admin_port, "/ready") == (200, "LIVE\n"),
            timeout_s=20,
            what="epoch 0 to be LIVE",
        )
        children.append(_start_envoy(envoy_family, envoy_family.root / "envoy-1.log", 1, slow))
        wait_until(
            lambda: http_get(envoy_family.admin_port, "/ready") == (503, "PRE_INITIALIZING\n"),
            timeout_s=20,
            what="admin to be answered by the initializing epoch 1",
        )
        prober.begin_round(cast("Generation", FakeGen(1, children[0].pid)))
        readable, _, _ = select.select([prober], [], [], 10)
        assert readable, "no observation within 10 s"
        observation = prober.take()
        still_initializing = http_get(envoy_family.admin_port, "/ready")
    finally:
        prober.close()
        _stop(*children, parent)
        envoy_family.shm.unlink(missing_ok=True)
    assert still_initializing == (503, "PRE_INITIALIZING\n"), "too slow to judge: it went LIVE"
    assert observation == HealthObservation(1, children[0].pid, "PRE_INITIALIZING", 1, 0, ())


REJECT_ALL_STATS = "stats_config:\n  stats_matcher:\n    reject_all: true\n"


def test_without_the_epoch_gauge_a_round_asks_server_info(envoy_family: EnvoyFamily) -> None:
    """A config whose stats matcher rejects every stat has no `server.hot_restart_epoch`
    in `/stats`: probation's rounds then take the epoch from `/server_info`, and a
    restart onto it goes LIVE and passes probation as usual."""
    envoy_family.write_raw(envoy_family.render("v0") + REJECT_ALL_STATS)
    daemon = envoy_family.start(*envoy_family.watched("--health-window", "1"))
    daemon.wait_event("child.serving", epoch=0, timeout_s=60)
    assert http_get(envoy_family.admin_port, ROUND_STATS_PATH) == (200, ""), "no gauge"
    envoy_family.write_raw(envoy_family.render("v1") + REJECT_ALL_STATS)
    daemon.wait_event("child.serving", epoch=1, timeout_s=60)
    daemon.wait_event("health.passed", epoch=1, timeout_s=60)
    assert not daemon.events("health.failed")
    wait_until(lambda: envoy_family.body() == "v1", timeout_s=30, what="v1 served")
