"""Admin's cost to Envoy: how long each request the daemon makes of admin holds the
new Envoy's main thread, by config size, and what a probation window asks in all.

Admin answers on Envoy's main thread, the one that also applies xDS updates, flushes
stats and runs the hot-restart handshake; while it walks a request, they wait. The
daemon asks admin for three things:

- the LIVE probe: `/ready`, then `/server_info` once it says LIVE (once a restart);
- a probation round, every 0.5 s of the health window: `/ready` and a filtered
  `/stats?usedonly` (the epoch gauge, the listener-failure counter) on one connection;
- between rounds whose `/stats` was dear, `/server_info` alone; the window's last
  second (`FINAL_STRETCH_S`) asks `/stats` every round all the same.

`/stats` walks every stat Envoy keeps, so its cost grows with the config; the prober
asks it at most a twentieth of the time. For each `--clusters` size this script starts
Envoy (no daemon) on loopstall's config with that many static clusters, times 15 of each
request (answered on an otherwise idle Envoy: the time to answer is about the main
thread's), then runs the real `HealthProber` through one window of rounds, 0.5 s
apart as probation runs them, and reports what share of the window admin spent
answering it. `filtered /stats` (without `usedonly`) is what rounds asked before.

    .venv/bin/python bench/admincost.py [--clusters 0 500 5000 20000] [--window 10]

Prints a table and writes bench/results/admincost.json (raw figures + environment).
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast

from _common import (
    ENVOY_BIN,
    BenchFamily,
    Json,
    environment,
    format_table,
    pick_base_id,
    shm_path,
    stop_on_sigterm,
    wait_for,
    write_results,
)
from loopstall import big_config

from envoy_autoreload import health
from envoy_autoreload.addresses import AdminAddress
from envoy_autoreload.admin import EPOCH_STAT, stats_path
from envoy_autoreload.probation import FINAL_STRETCH_S, ROUND_S

if TYPE_CHECKING:
    from envoy_autoreload.roster import Generation

SIZES: Final = (0, 500, 5000, 20000)
SAMPLES: Final = 15
WINDOW_S: Final = 10.0
OLD_ROUND_PATH: Final = stats_path(EPOCH_STAT, health.LISTENER_FAILURES_STAT)
REQUESTS: Final = {
    "/server_info": "/server_info",
    "round /stats (usedonly)": health.ROUND_STATS_PATH,
    "filtered /stats (before)": OLD_ROUND_PATH,
}


@dataclass(frozen=True)
class _Gen:
    epoch: int
    pid: int


def _get_ms(port: int, path: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        began = time.perf_counter()
        conn.request("GET", path, headers={"Connection": "close"})
        conn.getresponse().read()
        return (time.perf_counter() - began) * 1000
    finally:
        conn.close()


def _ready(port: int) -> bool | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/ready")
        return conn.getresponse().status == 200 or None
    except OSError:
        return None


def _window(port: int, pid: int, window_s: float) -> dict[str, Json]:
    """One health window of the real prober; every admin ask timed as it is made."""
    asks: list[tuple[bool, float]] = []  # (with /stats, ms)
    real = health.fetch_admin_facts

    def timed(address: AdminAddress, timeout_s: float, with_stats: bool = True) -> object:
        began = time.perf_counter()
        facts = real(address, timeout_s, with_stats)
        asks.append((with_stats, (time.perf_counter() - began) * 1000))
        return facts

    health.fetch_admin_facts = timed  # type: ignore[assignment]
    prober = health.HealthProber((), lambda _gen: AdminAddress("127.0.0.1", port))
    try:
        began = time.monotonic()
        for i in range(round(window_s / ROUND_S)):
            final = ROUND_S * i + FINAL_STRETCH_S >= window_s  # as probation says it
            prober.begin_round(cast("Generation", _Gen(0, pid)), final)
            time.sleep(max(0.0, began + ROUND_S * (i + 1) - time.monotonic()))
    finally:
        prober.close()
        health.fetch_admin_facts = real
    stats_ms = [ms for with_stats, ms in asks if with_stats]
    info_ms = [ms for with_stats, ms in asks if not with_stats]
    return {
        "rounds": len(asks),
        "with_stats": len(stats_ms),
        "server_info_only": len(info_ms),
        "stats_asks_ms": list(stats_ms),
        "server_info_asks_ms": list(info_ms),
        "admin_ms_total": sum(stats_ms) + sum(info_ms),
        "share_of_window": (sum(stats_ms) + sum(info_ms)) / (window_s * 1000),
    }


def measure(clusters: int, window_s: float, envoy: Path) -> dict[str, Json]:
    family = BenchFamily(pick_base_id(50000, 50999), envoy=envoy)
    config = family.tmp / "big.yaml"
    config.write_text(big_config(family, "x", 100, clusters))
    argv = [str(envoy), "-c", str(config), "--base-id", str(family.base_id)]
    process = subprocess.Popen(
        [*argv, "--log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: _ready(family.admin_port), timeout_s=300, what="Envoy to be LIVE")
        medians: dict[str, Json] = {}
        for name, path in REQUESTS.items():
            _get_ms(family.admin_port, path)  # warm
            medians[name] = statistics.median(
                _get_ms(family.admin_port, path) for _ in range(SAMPLES)
            )
        return {
            "clusters": clusters,
            "median_ms": medians,
            "window": _window(family.admin_port, process.pid, window_s),
        }
    finally:
        process.terminate()
        process.wait(60)
        shm_path(family.base_id).unlink(missing_ok=True)
        family.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--clusters", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--window", type=float, default=WINDOW_S, help="health window, s")
    parser.add_argument("--envoy", type=Path, default=ENVOY_BIN, help="the Envoy binary")
    args = parser.parse_args()
    stop_on_sigterm()
    env = environment(args.envoy)
    results: list[dict[str, Json]] = [measure(n, args.window, args.envoy) for n in args.clusters]
    rows = []
    for r in results:
        medians = cast("dict[str, float]", r["median_ms"])
        window = cast("dict[str, float]", r["window"])
        rows.append(
            [
                str(r["clusters"]),
                *(f"{medians[name]:.2f}" for name in REQUESTS),
                f"{window['with_stats']:.0f}/{window['rounds']:.0f}",
                f"{window['share_of_window'] * 100:.1f}%",
            ]
        )
    print()
    print("Time for admin to answer (ms, median of 15), and one probation window of rounds")
    header = ["clusters", *REQUESTS, "rounds with /stats", "window's share"]
    print(format_table(header, rows))
    sizes: list[Json] = list(results)
    payload: dict[str, Json] = {"bench": "admincost", "environment": env, "sizes": sizes}
    print(f"\nwrote {write_results('admincost', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
