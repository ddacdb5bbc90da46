"""Admin's questions against the real Envoy: the health prober's (the epoch, LIVE, and
the listener-failure counter as Envoy writes them, ENVOY_FACTS §15) and the LIVE
probe's (`/ready` and the epoch gauge, `/server_info` only for the versions), with a
hot-restarted child that is still PRE_INITIALIZING."""

from __future__ import annotations

import select
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from envoy_autoreload.addresses import AdminAddress
from envoy_autoreload.admin import EPOCH_STATS_PATH, ServerInfo, fetch_live_state
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
        assert filtered == (
            200,
            "listener_manager.listener_create_failure: 0\nserver.hot_restart_epoch: 0\n",
        ), "admin applies the (percent-encoded) filter and answers in the text format"
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


def test_the_live_probe_learns_the_epoch_without_server_info(envoy_family: EnvoyFamily) -> None:
    """The answering Envoy's own epoch from the gauge once `/ready` says LIVE, through a
    hot restart, and the versions only when asked for (`/server_info`). (`/ready`'s 503
    PRE_INITIALIZING of a loading child is the test above.)"""
    admin = AdminAddress("127.0.0.1", envoy_family.admin_port)
    envoy_family.write_config("v0")
    envoys = [_start_envoy(envoy_family, envoy_family.root / "envoy-0.log")]
    try:
        live_0 = wait_until(
            lambda: fetch_live_state(admin, versions=False),
            timeout_s=20,
            what="epoch 0 to answer",
        )
        with_versions = fetch_live_state(admin, versions=True)
        envoy_family.write_config("v1")
        envoys.append(_start_envoy(envoy_family, envoy_family.root / "envoy-1.log", 1))
        live_1 = wait_until(
            lambda: (
                (info := fetch_live_state(admin, versions=False)) is not None
                and info.restart_epoch == 1
                and info
            ),
            timeout_s=20,
            what="epoch 1 to answer admin",
        )
    finally:
        _stop(*reversed(envoys))
        envoy_family.shm.unlink(missing_ok=True)
    assert live_0 == ServerInfo("LIVE", 0, None, None, None)
    assert with_versions is not None
    assert (with_versions.state, with_versions.restart_epoch) == ("LIVE", 0)
    asked = subprocess.run(
        [str(ENVOY_BIN), "--hot-restart-version"], capture_output=True, text=True, check=True
    )
    assert with_versions.hot_restart_version == (asked.stdout + asked.stderr).strip()
    assert with_versions.version is not None and "/1.40" in with_versions.version
    assert live_1 == ServerInfo("LIVE", 1, None, None, None)


REJECT_ALL_STATS = "stats_config:\n  stats_matcher:\n    reject_all: true\n"


def test_without_the_epoch_gauge_the_live_probe_asks_server_info(
    envoy_family: EnvoyFamily,
) -> None:
    """A config whose stats matcher rejects every stat has no `server.hot_restart_epoch`
    in `/stats`: the LIVE probe then asks `/server_info`, and the restart goes LIVE
    as usual (not through the start deadline, nor as a hand-over without admin)."""
    envoy_family.write_raw(envoy_family.render("v0") + REJECT_ALL_STATS)
    admin = AdminAddress("127.0.0.1", envoy_family.admin_port)
    daemon = envoy_family.start(*envoy_family.watched("--health-window", "0"))
    daemon.wait_event("child.serving", epoch=0, timeout_s=60)
    assert http_get(envoy_family.admin_port, EPOCH_STATS_PATH) == (200, ""), "no gauge"
    info = fetch_live_state(admin, versions=False)
    assert info is not None and (info.state, info.restart_epoch) == ("LIVE", 0)
    assert info.version is not None, "the answer is /server_info's"
    envoy_family.write_raw(envoy_family.render("v1") + REJECT_ALL_STATS)
    serving = daemon.wait_event("child.serving", epoch=1, timeout_s=60)
    assert float(str(serving["startup_s"])) < 5, serving
    assert not daemon.events("child.admin_unreachable")
    wait_until(lambda: envoy_family.body() == "v1", timeout_s=30, what="v1 served")
