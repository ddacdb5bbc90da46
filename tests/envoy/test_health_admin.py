"""The health prober against the real Envoy's admin: the epoch, LIVE, and the
listener-failure counter as Envoy writes them (ENVOY_FACTS §15)."""

from __future__ import annotations

import select
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from envoy_autoreload.addresses import AdminAddress
from envoy_autoreload.health import LISTENER_FAILURES_PATH, HealthProber, UrlResult
from tests.envoy.conftest import ENVOY_BIN, EnvoyFamily
from tests.helpers import http_get, wait_until

if TYPE_CHECKING:
    from envoy_autoreload.roster import Generation


@dataclass(frozen=True)
class FakeGen:
    epoch: int
    pid: int


def _start_envoy(family: EnvoyFamily, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                str(ENVOY_BIN),
                *("-c", str(family.config), "--restart-epoch", "0"),
                *("--base-id", str(family.base_id), "--log-level", "warning"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


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
        filtered = http_get(envoy_family.admin_port, LISTENER_FAILURES_PATH)
        assert filtered == (200, "listener_manager.listener_create_failure: 0\n"), (
            "admin applies the (percent-encoded) filter and answers in the text format"
        )
        prober.begin_round(cast("Generation", FakeGen(0, envoy.pid)))
        readable, _, _ = select.select([prober], [], [], 10)
        assert readable, "no observation within 10 s"
        observation = prober.take()
    finally:
        prober.close()
        envoy.terminate()
        try:
            envoy.wait(10)
        except subprocess.TimeoutExpired:
            envoy.kill()
            envoy.wait()
        envoy_family.shm.unlink(missing_ok=True)
    assert observation is not None
    assert (observation.admin_state, observation.admin_epoch) == ("LIVE", 0)
    assert observation.listener_create_failures == 0
    assert observation.urls == (
        UrlResult(f"http://127.0.0.1:{envoy_family.listener_port}/", True, "HTTP 200"),
    )
