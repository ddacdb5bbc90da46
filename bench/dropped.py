"""Zero dropped requests under load, and the restart ceiling.

`wrk -t2 -c50 --latency` runs against the listener on 127.0.0.1 for the whole of each
run, while config changes (atomic renames of `envoy.yaml`) make the daemon hot restart
Envoy. The start script runs Envoy with `--drain-time-s 1 --parent-shutdown-time-s 2`.
wrk starts `LEAD_S` before the first change and runs `TAIL_S` past the last one, so the
last old parent's exit falls inside it. Per run: wrk's requests, non-2xx/3xx responses,
socket errors (connect/read/write/timeout), p99 and max latency; from the daemon's
JSON log: restarts requested, started, serving (LIVE), failed, refused by validation.

- **0**: wrk alone for ~8 s, no change: the baseline for p99 and req/s.
- **A**: 20 good changes, one every 3 s (each restart finds the old parent gone).
- **B**: 20 changes every 3 s; the odd ones are broken (a route to an unknown cluster,
  refused by `envoy --mode validate`), the even ones good, except one (10 of 20) that
  adds a listener on a port this script holds open with a plain socket: it validates,
  the new epoch fails to bind and exits, the serving epoch keeps serving, and the next
  good change restarts.
- **ceiling**: good changes every 2.5, 2.0, 1.5 and 1.0 s for `--ceiling-seconds` each
  (a fresh daemon each). The daemon waits for the previous parent to exit before the
  next epoch (`--max-drain-wait`, default 60 s), so restarts are paced at about
  parent-shutdown-time + debounce + validation + start apart whatever the change rate;
  changes in between are coalesced. Then the same at 1.0 s with `--max-drain-wait 0`
  (start as soon as the previous epoch is LIVE), to show what that pacing buys.
  Restarts/min is from the spacing of `child.started` (first to last).

    .venv/bin/python bench/dropped.py [--changes 20] [--ceiling-seconds 24]
                                      [--skip-modes] [--skip-ceiling]

Installs wrk with `apt-get install -y wrk` (Debian) if it is missing and we are root.
Bounded: ~5 minutes with the defaults. Prints tables and writes
bench/results/dropped.json (wrk's output, the change timeline, the daemon's events).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

# `python bench/dropped.py` puts bench/ first on sys.path, so the helper imports as-is.
from _common import (
    ENVOY_BIN,
    BenchError,
    BenchFamily,
    Event,
    Json,
    environment,
    fetch_body,
    format_table,
    parse_ts,
    pick_base_id,
    stop_on_sigterm,
    write_results,
)

BASE_IDS: Final = (50000, 50999)
START_TIMEOUT_S: Final = 60.0
LEAD_S: Final = 2.0  # wrk alone before the first change
TAIL_S: Final = 6.0  # after the last change: debounce, gate, start, 2 s parent shutdown
MODE_INTERVAL_S: Final = 3.0
CEILING_INTERVALS: Final = (2.5, 2.0, 1.5, 1.0)
WRK_ARGS: Final = ("-t2", "-c50", "--latency")
# Daemon events worth keeping for each run (the rest are counted by name).
TIMELINE_EVENTS: Final = frozenset(
    {
        "restart.requested",
        "validation.failed",
        "child.started",
        "child.serving",
        "child.exited",
        "restart.waiting",
        "restart.failed",
        "restart.retry_scheduled",
        "restart.abandoned",
        "restart.drain_wait_exceeded",
        "hot_restart.flag_cleared",
        "child.drain_cut",
        "child.died",
        "restart.full",
    }
)

Kind = Literal["good", "broken", "conflict"]


# -- wrk ---------------------------------------------------------------------------
def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise BenchError("wrk is not installed: `sudo apt-get install -y wrk` (Debian)")
    print("  installing wrk (apt-get install -y wrk) ...", flush=True)
    install = ["apt-get", "install", "-y", "wrk"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, capture_output=True, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, check=False)
        subprocess.run(install, capture_output=True, env=env, check=False)
    found = shutil.which("wrk")
    if not found:
        raise BenchError("could not install wrk with apt-get; install it and run again")
    return found


_UNITS: Final = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise BenchError(f"cannot read wrk's time {text!r}")
    return float(match[1]) * _UNITS[match[2]]


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    duration_s: float
    non_2xx_3xx: int
    connect: int
    read: int
    write: int
    timeout: int
    p50_s: float
    p99_s: float
    max_s: float
    rps: float
    output: str

    @property
    def errors(self) -> int:
        return self.non_2xx_3xx + self.connect + self.read + self.write + self.timeout


def parse_wrk(output: str) -> WrkResult:
    done = re.search(r"(\d+) requests in ([\d.]+\w+),", output)
    if not done:
        raise BenchError(f"wrk printed no summary:\n{output}")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    latency = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", output, re.M)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not (p50 and p99 and latency and rps):
        raise BenchError(f"cannot read wrk's latency:\n{output}")
    counts = [int(errors[i]) for i in range(1, 5)] if errors else [0, 0, 0, 0]
    return WrkResult(
        requests=int(done[1]),
        duration_s=_seconds(done[2]),
        non_2xx_3xx=int(non_2xx[1]) if non_2xx else 0,
        connect=counts[0],
        read=counts[1],
        write=counts[2],
        timeout=counts[3],
        p50_s=_seconds(p50[1]),
        p99_s=_seconds(p99[1]),
        max_s=_seconds(latency[1]),
        rps=float(rps[1]),
        output=output,
    )


@dataclass
class Wrk:
    """wrk in its own session; `kill()` ends exactly that session."""

    binary: str
    url: str
    seconds: int
    process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, *WRK_ARGS, f"-d{self.seconds}s", self.url],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def result(self) -> WrkResult:
        assert self.process is not None
        output, _ = self.process.communicate(timeout=self.seconds + 30)
        if self.process.returncode != 0:
            raise BenchError(f"wrk exited {self.process.returncode}:\n{output}")
        return parse_wrk(output)

    def kill(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


# -- configs -----------------------------------------------------------------------
def broken_config(family: BenchFamily, body: str) -> str:
    """Valid YAML, but the route names a cluster that does not exist: validation fails."""
    text, count = re.subn(
        r'direct_response:\n\s+status: 200\n\s+body: \{ inline_string: "[^"]*" \}',
        "route: { cluster: no_such_cluster }",
        family.config_text(body),
    )
    assert count == 1, "the config template changed; update broken_config()"
    return text


def conflict_config(family: BenchFamily, body: str, held_port: int) -> str:
    """A second listener on `held_port`: it validates, but the new epoch cannot bind it.
    The listener block runs to the end of the template, so a copy appends as a second
    list item."""
    text = family.config_text(body)
    block = text[text.index("    - name: main\n") :]
    second = block.replace("name: main", "name: conflict").replace(
        f"port_value: {family.listener_port}", f"port_value: {held_port}"
    )
    assert f"port_value: {held_port}" in second, "the config template changed"
    return text + second


# -- one run ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Change:
    index: int
    kind: Kind
    body: str
    at_s: float  # since wrk started


@dataclass
class Run:
    label: str
    interval_s: float
    options: list[str]
    wrk: WrkResult | None = None
    changes: list[Change] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    timeline: list[dict[str, Json]] = field(default_factory=list)
    restarts_per_min: float | None = None
    final_body: str | None = None
    expected_body: str = ""
    base_id: int = 0

    @property
    def serving(self) -> int:
        return self.counts.get("child.serving", 0)

    def to_json(self) -> dict[str, Json]:
        wrk = dataclasses.asdict(self.wrk) if self.wrk is not None else None
        return {
            "label": self.label,
            "interval_s": self.interval_s,
            "options": list(self.options),
            "base_id": self.base_id,
            "wrk": wrk,
            "wrk_errors": self.wrk.errors if self.wrk is not None else None,
            "changes": [dataclasses.asdict(c) for c in self.changes],
            "counts": dict(self.counts),
            "restarts_per_min": self.restarts_per_min,
            "final_body": self.final_body,
            "expected_body": self.expected_body,
            "timeline": list(self.timeline),
        }


def conflict_index(changes: int) -> int:
    """Mode B's port conflict: the even change in the middle (10 of 20)."""
    return max(2, changes // 4 * 2)


def schedule(changes: int, mode: Literal["A", "B", "ceiling"]) -> list[Kind]:
    if mode != "B":
        return ["good"] * changes
    kinds: list[Kind] = []
    conflict_at = conflict_index(changes)
    for index in range(1, changes + 1):
        if index % 2:
            kinds.append("broken")
        elif index == conflict_at:
            kinds.append("conflict")
        else:
            kinds.append("good")
    return kinds


def traffic_run(
    run: Run, kinds: list[Kind], wrk_binary: str, envoy: Path, held: socket.socket | None
) -> Run:
    family = BenchFamily(pick_base_id(*BASE_IDS), envoy=envoy)
    run.base_id = family.base_id
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", run.label).strip("-")
    seconds = round(LEAD_S + len(kinds) * run.interval_s + TAIL_S + 0.5)
    wrk = Wrk(wrk_binary, f"http://127.0.0.1:{family.listener_port}/", seconds)
    try:
        family.write_config(f"{tag}-v0")
        log = family.start(*run.options)
        family.wait_event("child.serving", timeout_s=START_TIMEOUT_S, epoch=0)
        family.wait_body(f"{tag}-v0")
        mark = log.mark()
        run.expected_body = f"{tag}-v0"
        print(
            f"  [{run.label}] wrk {seconds} s, {len(kinds)} changes every {run.interval_s:g} s",
            flush=True,
        )
        wrk_wall = time.time()
        began = time.monotonic()
        wrk.start()
        for index, kind in enumerate(kinds, start=1):
            delay = began + LEAD_S + (index - 1) * run.interval_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            body = f"{tag}-v{index}"
            if kind == "good":
                family.write_config(body)
                run.expected_body = body
            elif kind == "broken":
                family.write_config_text(broken_config(family, body))
            else:
                assert held is not None
                family.write_config_text(conflict_config(family, body, held.getsockname()[1]))
            run.changes.append(Change(index, kind, body, time.monotonic() - began))
        run.wrk = wrk.result()
        got = fetch_body(family.listener_port)
        run.final_body = got.decode(errors="replace") if got is not None else None
        events = log.refresh()[mark:]
        for event in events:
            name = event.get("event")
            if isinstance(name, str):
                run.counts[name] = run.counts.get(name, 0) + 1
            if name in TIMELINE_EVENTS:
                run.timeline.append(compact(event, wrk_wall))
        run.restarts_per_min = rate([e for e in events if e.get("event") == "child.started"])
        return run
    finally:
        wrk.kill()
        family.close()


def compact(event: Event, zero: float) -> dict[str, Json]:
    keep = ("event", "epoch", "pid", "reason", "status", "cause", "count", "startup_s")
    out: dict[str, Json] = {"t": round(parse_ts(event) - zero, 3)}
    out.update({k: event[k] for k in keep if k in event and event[k] is not None})
    message = event.get("message")
    if event.get("event") in ("validation.failed", "restart.failed") and isinstance(message, str):
        out["message"] = message[:300]
    return out


def rate(started: list[Event]) -> float | None:
    if len(started) < 2:
        return None
    span = parse_ts(started[-1]) - parse_ts(started[0])
    return (len(started) - 1) * 60 / span if span > 0 else None


# -- main --------------------------------------------------------------------------
def wrk_cells(run: Run) -> list[str]:
    w = run.wrk
    assert w is not None
    return [
        f"{w.requests:,}",
        f"{w.rps:,.0f}",
        str(w.non_2xx_3xx),
        f"{w.connect}/{w.read}/{w.write}/{w.timeout}",
        f"{w.p99_s * 1000:.2f}",
        f"{w.max_s * 1000:.1f}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--changes", type=int, default=20, help="changes in modes A and B")
    parser.add_argument(
        "--ceiling-seconds", type=float, default=24.0, help="changes per interval (s)"
    )
    parser.add_argument("--skip-modes", action="store_true", help="only the ceiling sweep")
    parser.add_argument("--skip-ceiling", action="store_true", help="only modes A and B")
    parser.add_argument("--envoy", type=Path, default=ENVOY_BIN, help="the Envoy binary")
    args = parser.parse_args()
    stop_on_sigterm()
    if args.changes < 2 or args.ceiling_seconds < 3:
        parser.error("--changes >= 2 and --ceiling-seconds >= 3")

    wrk_binary = ensure_wrk()
    env = environment(args.envoy)
    env["wrk"] = subprocess.run(
        [wrk_binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    modes: list[Run] = []
    ceiling: list[Run] = []
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        if not args.skip_modes:
            # The baseline: wrk alone, no change (its p99 is the one to compare with).
            baseline = Run("0 (no changes)", MODE_INTERVAL_S, [])
            modes.append(traffic_run(baseline, [], wrk_binary, args.envoy, None))
            for mode in ("A", "B"):
                label = f"{mode} ({'good' if mode == 'A' else 'broken+conflict'})"
                run = Run(label, MODE_INTERVAL_S, [])
                modes.append(
                    traffic_run(run, schedule(args.changes, mode), wrk_binary, args.envoy, held)
                )
        if not args.skip_ceiling:
            sweep: list[tuple[float, list[str]]] = [(i, []) for i in CEILING_INTERVALS]
            sweep.append((1.0, ["--max-drain-wait", "0"]))
            for interval, options in sweep:
                changes = max(2, round(args.ceiling_seconds / interval))
                label = f"every {interval:g} s" + (" " + " ".join(options) if options else "")
                run = Run(label, interval, options)
                ceiling.append(
                    traffic_run(run, schedule(changes, "ceiling"), wrk_binary, args.envoy, None)
                )
    finally:
        held.close()

    if modes:
        print()
        print("Dropped requests: wrk -t2 -c50 on 127.0.0.1, a change every 3 s")
        rows = [
            [
                r.label,
                str(len(r.changes)),
                str(r.counts.get("validation.failed", 0)),
                str(r.counts.get("restart.failed", 0)),
                str(r.counts.get("child.started", 0)),
                str(r.serving),
                *wrk_cells(r),
                "yes" if r.final_body == r.expected_body else f"NO ({r.final_body})",
            ]
            for r in modes
        ]
        print(
            format_table(
                [
                    "mode",
                    "changes",
                    "refused",
                    "child failed",
                    "started",
                    "LIVE",
                    "requests",
                    "req/s",
                    "non-2xx",
                    "errors c/r/w/t",
                    "p99 ms",
                    "max ms",
                    "final body ok",
                ],
                rows,
            )
        )
    if ceiling:
        print()
        print(
            "Restart ceiling: good changes at each interval, --drain-time-s 1 "
            "--parent-shutdown-time-s 2"
        )
        rows = [
            [
                r.label,
                str(len(r.changes)),
                str(r.counts.get("restart.requested", 0)),
                str(r.counts.get("child.started", 0)),
                str(r.serving),
                str(r.counts.get("restart.waiting", 0)),
                "-" if r.restarts_per_min is None else f"{r.restarts_per_min:.1f}",
                *wrk_cells(r),
            ]
            for r in ceiling
        ]
        print(
            format_table(
                [
                    "changes",
                    "n",
                    "requested",
                    "started",
                    "LIVE",
                    "waited",
                    "restarts/min",
                    "requests",
                    "req/s",
                    "non-2xx",
                    "errors c/r/w/t",
                    "p99 ms",
                    "max ms",
                ],
                rows,
            )
        )
    path = write_results(
        "dropped",
        {
            "bench": "dropped",
            "wrk_args": [*WRK_ARGS, "-d<seconds>s"],
            "lead_s": LEAD_S,
            "tail_s": TAIL_S,
            "environment": env,
            "modes": [r.to_json() for r in modes],
            "ceiling": [r.to_json() for r in ceiling],
        },
    )
    print(f"\nwrote {path}")
    bad = [r.label for r in (*modes, *ceiling) if r.wrk is not None and r.wrk.errors]
    if bad:
        print(f"NOTE: wrk saw errors in: {', '.join(bad)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
