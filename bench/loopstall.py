"""Loop stalls: the longest the daemon's event loop was busy during a hot restart onto a
~5 MB config, and during a burst of 10,000 files.

The daemon has one event loop; while one event is handled, every other one (a signal, a
child's exit, a control request, the next probe) waits. The daemon times each turn of
its loop, from `select` returning to the next `select` call, into
`envoy_autoreload_loop_busy_seconds` (a histogram) and `_loop_busy_max_seconds` (the
longest since start), both on `/metrics`. This bench reads them before and after each
window and reports the longest turn in it: exact when the maximum rose in the window,
otherwise bounded by the histogram (every turn of the window fell at or below that
bucket), with how many turns took more than 50 ms (issue 16's bound).

Scenarios, each on a daemon of its own (`--state-dir` outside the watched tree, so
generations are on, as in production):

- `restart`: the daemon starts on a small config; then a generated ~5 MB config
  (`--routes` direct-response routes plus 500 static clusters, valid for Envoy 1.40) is
  saved over it, and then a second one with another body: two hot restarts, small→5 MB
  and 5 MB→5 MB. Each window runs from the save until the old parent exited.
- `startup` (first, on a daemon of its own): the daemon starts on the big config; until
  its loop runs (`watch.started`, the last event before it), until the body is served,
  and the daemon's peak RSS (`VmHWM`).
- `burst`: `--files` new files are written into the watched tree as fast as Python can,
  one config edit among them (as `storm.py` does); the window runs from the first write
  until the old parent exited.

    .venv/bin/python bench/loopstall.py [--routes 29000] [--files 10000]

Prints a table and writes bench/results/loopstall.json (raw figures + environment).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# `python bench/loopstall.py` puts bench/ first on sys.path, so the helper imports as-is.
from _common import (
    ENVOY_BIN,
    BenchError,
    BenchFamily,
    Json,
    environment,
    format_table,
    free_port,
    number,
    parse_ts,
    pick_base_id,
    status_kb,
    stop_on_sigterm,
    write_results,
)

# Disjoint from every other bench (50000-50999, exec_facts 61000-61999) and the tests
# (from 20000, 50 per test process).
BASE_IDS: Final = (53000, 53499)
ROUTES: Final = 29_000  # about 5 MB of YAML
CLUSTERS: Final = 500
FILES: Final = 10_000
START_TIMEOUT_S: Final = 120.0
STEP_TIMEOUT_S: Final = 120.0
BOUND_S: Final = 0.05  # the most an event may wait (issue 16)
METRIC: Final = "envoy_autoreload_loop_busy"

HEADER: Final = """\
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}
static_resources:
  listeners:
    - name: main
      address:
        socket_address: {{ address: 127.0.0.1, port_value: {listener_port} }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.\
http_connection_manager.v3.HttpConnectionManager
                stat_prefix: main
                access_log:
                  - name: envoy.access_loggers.file
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.\
FileAccessLog
                      path: {access_log}
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
"""
ROUTE: Final = """\
                        - match: {{ path: "/service-{i:05d}/health" }}
                          direct_response: {{ status: 200, body: {{ inline_string: "{i} ok" }} }}
"""
CLUSTER_ROUTE: Final = """\
                        - match: {{ prefix: "/cluster-{i:03d}/" }}
                          route: {{ cluster: cluster-{i:03d}, timeout: 15s }}
"""
LAST_ROUTE: Final = """\
                        - match: {{ prefix: "/" }}
                          direct_response:
                            status: 200
                            body: {{ inline_string: "{body}" }}
  clusters:
"""
CLUSTER: Final = """\
    - name: cluster-{i:03d}
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: cluster-{i:03d}
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {{ address: 127.0.0.1, port_value: {port} }}
"""


def big_config(family: BenchFamily, body: str, routes: int, clusters: int = CLUSTERS) -> str:
    """A valid Envoy 1.40 bootstrap of `routes` direct-response routes and `clusters`
    static clusters (each routed to): about 170 bytes a route."""
    parts = [
        HEADER.format(
            admin_port=family.admin_port,
            listener_port=family.listener_port,
            access_log=family.tmp / "access.log",
        )
    ]
    parts += [ROUTE.format(i=i) for i in range(routes)]
    parts += [CLUSTER_ROUTE.format(i=i) for i in range(clusters)]
    parts.append(LAST_ROUTE.format(body=body))
    parts += [CLUSTER.format(i=i, port=10000 + i) for i in range(clusters)]
    return "".join(parts)


@dataclass(frozen=True, slots=True)
class Busy:
    """The loop-busy metrics at one moment."""

    max_s: float
    count: float
    sum_s: float
    buckets: dict[str, float]  # le -> cumulative count


@dataclass(frozen=True, slots=True)
class Window:
    scenario: str
    longest_s: float | None  # exact: the maximum rose in the window
    at_most_s: float | None  # else: every turn of the window was at most this
    turns: int
    over_bound: int  # turns longer than BOUND_S
    busy_total_s: float
    loadavg: list[float]
    detail: dict[str, Json]

    def longest(self) -> str:
        if self.longest_s is not None:
            return f"{self.longest_s * 1000:.1f}"
        return "≤ inf" if self.at_most_s is None else f"≤ {self.at_most_s * 1000:g}"


def read_busy(port: int) -> Busy:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    buckets: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(METRIC):
            continue
        name, value = line.rsplit(" ", 1)
        if name.startswith(f"{METRIC}_seconds_bucket"):
            buckets[name.split('le="', 1)[1].split('"', 1)[0]] = float(value)
        else:
            values[name] = float(value)
    try:
        return Busy(
            values[f"{METRIC}_max_seconds"],
            values[f"{METRIC}_seconds_count"],
            values[f"{METRIC}_seconds_sum"],
            buckets,
        )
    except KeyError as err:
        raise BenchError(f"/metrics has no {err}: a daemon without the loop metrics") from None


def window(scenario: str, before: Busy, after: Busy, detail: dict[str, Json]) -> Window:
    delta = {le: after.buckets[le] - before.buckets.get(le, 0.0) for le in after.buckets}
    turns = int(after.count - before.count)
    at_most = None
    for le, count in sorted(delta.items(), key=lambda item: float(item[0])):
        if le != "+Inf" and count >= turns:
            at_most = float(le)
            break
    within = next((c for le, c in delta.items() if float(le) == BOUND_S), float(turns))
    return Window(
        scenario=scenario,
        longest_s=after.max_s if after.max_s > before.max_s else None,
        at_most_s=at_most,
        turns=turns,
        over_bound=int(turns - within),
        busy_total_s=after.sum_s - before.sum_s,
        loadavg=list(os.getloadavg()),
        detail=detail,
    )


def start_family(envoy: Path, status_port: int) -> BenchFamily:
    family = BenchFamily(pick_base_id(*BASE_IDS), envoy=envoy)
    family.write_config("stall-v0")
    state = family.tmp / "state"
    family.start("--state-dir", str(state), "--status-address", f"127.0.0.1:{status_port}")
    family.wait_event("child.serving", timeout_s=START_TIMEOUT_S, epoch=0)
    family.wait_body("stall-v0", timeout_s=START_TIMEOUT_S)
    return family


def one_restart(
    family: BenchFamily, status_port: int, text: str, body: str, epoch: int, label: str
) -> Window:
    """Save `text` over the config; the window ends when epoch `epoch - 1` exited."""
    log = family.log
    assert log is not None
    mark = log.mark()
    before = read_busy(status_port)
    saved_at, saved_wall = time.monotonic(), time.time()
    family.write_config_text(text)
    served_at = family.wait_body(body, timeout_s=STEP_TIMEOUT_S)
    requested = family.wait_event("restart.requested", mark=mark, timeout_s=STEP_TIMEOUT_S)
    serving = family.wait_event("child.serving", mark=mark, timeout_s=STEP_TIMEOUT_S, epoch=epoch)
    family.wait_event("child.exited", mark=mark, timeout_s=STEP_TIMEOUT_S, epoch=epoch - 1)
    after = read_busy(status_port)
    validated = log.since(mark, "validation.passed")
    detail: dict[str, Json] = {
        "config_bytes": len(text.encode()),
        "validation_s": number(validated[0], "duration_s") if validated else None,
        "saved_to_requested_s": parse_ts(requested) - saved_wall,
        "requested_to_serving_logged_s": parse_ts(serving) - parse_ts(requested),
        "saved_to_served_s": served_at - saved_at,
        "restarts": len(log.since(mark, "child.started")),
        "max_before_s": before.max_s,
        "max_after_s": after.max_s,
    }
    return window(label, before, after, detail)


def restart_scenario(envoy: Path, routes: int) -> list[Window]:
    status_port = free_port()
    family = start_family(envoy, status_port)
    try:
        windows = []
        for epoch, body in ((1, "stall-v1"), (2, "stall-v2")):
            text = big_config(family, body, routes)
            size = f"{len(text.encode()) / 1e6:.1f} MB"
            label = f"restart {'small' if epoch == 1 else size}→{size}"
            print(f"  {label} ...", flush=True)
            windows.append(one_restart(family, status_port, text, body, epoch, label))
        return windows
    finally:
        family.close()


def burst_scenario(envoy: Path, files: int) -> Window:
    status_port = free_port()
    family = start_family(envoy, status_port)
    try:
        log = family.log
        assert log is not None
        data = family.root / "data"
        data.mkdir()
        print(f"  burst of {files:,} files ...", flush=True)
        mark = log.mark()
        before = read_busy(status_port)
        first_at = time.monotonic()
        for i in range(files):
            if i == files // 2:
                family.write_config("stall-burst")
            (data / f"burst-{i:05d}.json").write_text(f'{{"n": {i}}}\n')
        last_at = time.monotonic()
        served_at = family.wait_body("stall-burst", timeout_s=STEP_TIMEOUT_S)
        family.wait_event("child.serving", mark=mark, timeout_s=STEP_TIMEOUT_S, epoch=1)
        family.wait_event("child.exited", mark=mark, timeout_s=STEP_TIMEOUT_S, epoch=0)
        after = read_busy(status_port)
        requested = log.since(mark, "restart.requested")
        detail: dict[str, Json] = {
            "files": files,
            "write_s": last_at - first_at,
            "last_write_to_served_s": served_at - last_at,
            "events": requested[0].get("events") if requested else None,
            "restarts": len(log.since(mark, "child.started")),
            "overflows": len(log.since(mark, "watch.overflow")),
            "max_before_s": before.max_s,
            "max_after_s": after.max_s,
        }
        return window(f"burst of {files:,} files", before, after, detail)
    finally:
        family.close()


@dataclass(frozen=True, slots=True)
class Startup:
    config_bytes: int
    validation_s: float | None
    start_to_loop_s: float
    start_to_serving_logged_s: float
    start_to_served_s: float
    peak_rss_mib: float
    rss_mib: float


def startup_scenario(envoy: Path, routes: int) -> Startup:
    """The daemon started on the big config: until its loop runs (`watch.started`, the
    last event before it) and serves, and its peak RSS, which a parse of the config in
    the daemon (before 9b38d9e) took to ~4 times the file's size."""
    family = BenchFamily(pick_base_id(*BASE_IDS), envoy=envoy)
    try:
        text = big_config(family, "stall-start", routes)
        family.write_config_text(text)
        print(f"  start-up on {len(text.encode()) / 1e6:.1f} MB ...", flush=True)
        began_wall, began = time.time(), time.monotonic()
        family.start("--state-dir", str(family.tmp / "state"))
        served_at = family.wait_body("stall-start", timeout_s=STEP_TIMEOUT_S)
        watching = family.wait_event("watch.started", timeout_s=STEP_TIMEOUT_S)
        serving = family.wait_event("child.serving", timeout_s=STEP_TIMEOUT_S, epoch=0)
        validated = family.wait_event("validation.passed", timeout_s=STEP_TIMEOUT_S)
        assert family.process is not None
        return Startup(
            config_bytes=len(text.encode()),
            validation_s=number(validated, "duration_s"),
            start_to_loop_s=parse_ts(watching) - began_wall,
            start_to_serving_logged_s=parse_ts(serving) - began_wall,
            start_to_served_s=served_at - began,
            peak_rss_mib=status_kb(family.process.pid, "VmHWM") / 1024,
            rss_mib=status_kb(family.process.pid, "VmRSS") / 1024,
        )
    finally:
        family.close()


def _served(w: Window) -> str:
    """The save (or the burst's last write) until the new body was served."""
    for key in ("saved_to_served_s", "last_write_to_served_s"):
        value = w.detail.get(key)
        if isinstance(value, float):
            return f"{value:.2f}"
    return "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--routes", type=int, default=ROUTES, help="routes in the big config")
    parser.add_argument("--files", type=int, default=FILES, help="files in the burst")
    parser.add_argument("--envoy", type=Path, default=ENVOY_BIN, help="the Envoy binary")
    args = parser.parse_args()
    stop_on_sigterm()
    if args.routes < 1 or args.files < 2:
        parser.error("--routes must be at least 1 and --files at least 2")

    env = environment(args.envoy)
    began = time.monotonic()
    startup = startup_scenario(args.envoy, args.routes)
    windows = [*restart_scenario(args.envoy, args.routes), burst_scenario(args.envoy, args.files)]
    rows = [
        [
            w.scenario,
            w.longest(),
            str(w.turns),
            str(w.over_bound),
            f"{w.busy_total_s * 1000:.0f}",
            _served(w),
            " ".join(f"{x:.2f}" for x in w.loadavg),
        ]
        for w in windows
    ]
    print()
    print("Longest turn of the daemon's event loop (ms); a turn runs from select() returning")
    print("to the next select(): the longest an event that became ready meanwhile waited")
    header = ["window", "longest turn", "turns", "turns > 50 ms", "busy total", "to served s"]
    print(format_table([*header, "loadavg"], rows))
    print(
        f"\nStart-up on the big config: loop running after {startup.start_to_loop_s:.2f} s, "
        f"serving after {startup.start_to_served_s:.2f} s, the daemon's peak RSS "
        f"{startup.peak_rss_mib:.0f} MiB (now {startup.rss_mib:.0f})"
    )
    path = write_results(
        "loopstall",
        {
            "bench": "loopstall",
            "routes": args.routes,
            "files": args.files,
            "seconds": time.monotonic() - began,
            "environment": env,
            "windows": [dataclasses.asdict(w) for w in windows],
            "startup": dataclasses.asdict(startup),
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
