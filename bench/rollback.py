"""Rollback: what a push that validates but fails probation costs, under load.

The daemon runs with `--state-dir` (a temp directory beside the watched one),
`--health-window 5`, `--health-url http://127.0.0.1:<listener>/` and `--debounce 0.05`;
the start script runs the validated snapshot (`-c "${ENVOY_AUTORELOAD_SNAPSHOT:-...}"`)
with `--drain-time-s 1 --parent-shutdown-time-s 2`. The listener answers 200 through a
`direct_response`. Once epoch 0 has passed probation (`health.passed`), each push:

- `wrk -t2 -c50 -d<seconds>s --latency` on 127.0.0.1 starts, and a thread asks the
  listener every 10 ms over a NEW connection (its status: 200, 503 or no answer);
- `LEAD_S` later the config is replaced (atomic rename) by one whose route answers 503
  with a new body each time (failed bytes are not tried again). It validates, goes LIVE,
  and the `--health-url` fails: 3 rounds 0.5 s apart in a row, so `health.failed` about
  1 s after LIVE at the earliest, then `rollback.started` and a hot restart to the last
  good generation without waiting for the drain, `rollback.finished` once it is LIVE;
- after wrk ends, a new good config (new body) is written and its probation awaited, so
  every push starts from a generation that passed.

Per push: wrk's requests, non-2xx (about the requests answered by the bad generation),
socket errors; from the daemon's JSON log (`ts`, ms): push to the bad `child.serving`,
"detection" (`health.failed` minus the bad `child.serving`), "bad served for"
(`rollback.finished` minus the bad `child.serving`); from the poll: "push to good again"
(the first 200 after the first 503, minus the push). Then the same push once on a fresh
daemon with `--no-rollback` (and its own state directory): the 503s last until wrk ends.

    .venv/bin/python bench/rollback.py [--pushes 5] [--seconds 6]

Needs wrk (installs it with `apt-get install -y wrk` when root, as dropped.py does).
~75 s with the defaults. Prints a table and writes bench/results/rollback.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

# `python bench/rollback.py` puts bench/ first on sys.path, so the helpers import as-is.
from _common import (
    ENVOY_BIN,
    BenchError,
    BenchFamily,
    DaemonLog,
    Event,
    Json,
    environment,
    format_table,
    parse_ts,
    pick_base_id,
    stop_on_sigterm,
    summary,
    write_results,
)
from dropped import WRK_ARGS, Wrk, WrkResult, ensure_wrk

# outage.py takes 50900-50999; dropped.py, idle.py and scale.py the whole of
# 50000-50999. pick_base_id() skips a base id whose shared memory exists, and run_all
# runs one script at a time.
BASE_IDS: Final = (50800, 50899)
HEALTH_WINDOW_S: Final = 5.0
DEBOUNCE_S: Final = 0.05
POLL_INTERVAL_S: Final = 0.01
LEAD_S: Final = 1.5  # wrk alone before the push
START_TIMEOUT_S: Final = 60.0
STEP_TIMEOUT_S: Final = 30.0
DEFAULT_PUSHES: Final = 5
DEFAULT_SECONDS: Final = 6

# The template's START_SCRIPT with the snapshot: a rollback needs the script to start
# what the daemon names (the daemon skips rollback when the script ignores it).
START_SCRIPT: Final = """\
#!/bin/sh
exec {envoy} -c "${{ENVOY_AUTORELOAD_SNAPSHOT:-{config}}}" --restart-epoch "$RESTART_EPOCH" \\
    --base-id {base_id} --drain-time-s 1 --parent-shutdown-time-s 2 --log-level warning
"""
TIMELINE_EVENTS: Final = frozenset(
    {
        "restart.requested",
        "validation.passed",
        "validation.failed",
        "child.started",
        "child.serving",
        "child.draining",
        "child.exited",
        "child.died",
        "child.drain_cut",
        "restart.waiting",
        "restart.failed",
        "health.probation",
        "health.passed",
        "health.failed",
        "rollback.started",
        "rollback.finished",
        "rollback.skipped",
        "rollback.impossible",
        "config.known_bad",
    }
)


# -- the poll ------------------------------------------------------------------------
def fetch_status(port: int, timeout_s: float = 1.0) -> int:
    """GET / over a NEW connection: the status code, 0 when nothing answered.

    Only the status line is read; the close is an RST (SO_LINGER 0), so neither Envoy's
    delayed close nor TIME_WAIT ports get in the way (see _common.fetch_body)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    return 0
                data += chunk
    except OSError:
        return 0
    parts = data.split(b"\r\n", 1)[0].split()
    if len(parts) < 2 or not parts[1].isdigit():
        return 0
    return int(parts[1])


@dataclass
class StatusPoller:
    """A thread asking the listener every ~10 ms: (wall time of the answer, status)."""

    port: int
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            status = fetch_status(self.port)
            self.samples.append((time.time(), status))  # list.append: atomic
            self._stop.wait(POLL_INTERVAL_S)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return list(self.samples)


@dataclass(frozen=True, slots=True)
class PollTrace:
    """What the fresh-connection poll saw, times in s from the push."""

    polls: int
    first_503_s: float | None
    first_200_after_s: float | None  # the first 200 after the first 503
    answered_503: int
    no_answer: int  # after the push: refused, reset, timed out
    other: int  # after the push: neither 200 nor 503
    non_200_before_push: int


def analyse(samples: list[tuple[float, int]], push_wall: float) -> PollTrace:
    after = [(t - push_wall, s) for t, s in samples if t >= push_wall]
    first_503 = next((i for i, (_, s) in enumerate(after) if s == 503), None)
    first_ok = (
        None if first_503 is None else next((t for t, s in after[first_503:] if s == 200), None)
    )
    return PollTrace(
        polls=len(after),
        first_503_s=None if first_503 is None else after[first_503][0],
        first_200_after_s=first_ok,
        answered_503=sum(1 for _, s in after if s == 503),
        no_answer=sum(1 for _, s in after if s == 0),
        other=sum(1 for _, s in after if s not in (0, 200, 503)),
        non_200_before_push=sum(1 for t, s in samples if t < push_wall and s != 200),
    )


# -- configs -------------------------------------------------------------------------
def bad_config(family: BenchFamily, body: str) -> str:
    """Valid, and LIVE like any other, but every request is answered 503."""
    text = family.config_text(body)
    assert text.count("status: 200") == 1, "the config template changed; update bad_config()"
    return text.replace("status: 200", "status: 503")


def compact(event: Event, zero: float) -> dict[str, Json]:
    keep = ("event", "epoch", "pid", "reason", "status", "config", "to_config", "check")
    out: dict[str, Json] = {"t": round(parse_ts(event) - zero, 3)}
    out.update({k: event[k] for k in keep if k in event and event[k] is not None})
    message = event.get("message")
    if event.get("event") == "health.failed" and isinstance(message, str):
        out["message"] = message[:300]
    return out


# -- one push ------------------------------------------------------------------------
@dataclass
class Push:
    label: str  # "rollback #N" or "--no-rollback"
    rollback: bool
    bad_body: str
    wrk: WrkResult | None = None
    poll: PollTrace | None = None
    bad_epoch: int | None = None
    push_to_bad_serving_s: float | None = None
    detection_s: float | None = None  # health.failed - bad child.serving
    rollback_started_s: float | None = None  # rollback.started - bad child.serving
    bad_served_for_s: float | None = None  # rollback.finished - bad child.serving
    push_to_good_s: float | None = None  # poll: first 200 after the 503s - push
    served_until_wrk_end_s: float | None = None  # --no-rollback: wrk's end - bad serving
    finished_before_wrk_end: bool | None = None
    check: str | None = None
    timeline: list[dict[str, Json]] = field(default_factory=list)

    def to_json(self) -> dict[str, Json]:
        out: dict[str, Json] = {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if k not in ("wrk", "poll", "timeline")
        }
        out["wrk"] = dataclasses.asdict(self.wrk) if self.wrk is not None else None
        out["socket_errors"] = None if self.wrk is None else socket_errors(self.wrk)
        out["poll"] = dataclasses.asdict(self.poll) if self.poll is not None else None
        out["timeline"] = list(self.timeline)
        return out


def socket_errors(w: WrkResult) -> int:
    return w.connect + w.read + w.write + w.timeout


def first(events: list[Event], name: str, **match: Json) -> Event | None:
    return next(
        (
            e
            for e in events
            if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
        ),
        None,
    )


def push_once(family: BenchFamily, push: Push, wrk_binary: str, seconds: int) -> Push:
    """wrk for `seconds`, the bad config `LEAD_S` in; with rollback, its end awaited."""
    log = family.log
    assert log is not None
    mark = log.mark()
    wrk = Wrk(wrk_binary, f"http://127.0.0.1:{family.listener_port}/", seconds)
    poller = StatusPoller(family.listener_port)
    poller.start()
    try:
        wrk.start()
        time.sleep(LEAD_S)
        push_wall = time.time()
        family.write_config_text(bad_config(family, push.bad_body))
        end = "rollback.finished" if push.rollback else "rollback.skipped"
        family.wait_event(end, mark=mark, timeout_s=STEP_TIMEOUT_S)
        push.wrk = wrk.result()
        wrk_end = time.time()
    finally:
        wrk.kill()
        samples = poller.stop()

    events = log.refresh()[mark:]
    push.timeline = [compact(e, push_wall) for e in events if e.get("event") in TIMELINE_EVENTS]
    started = first(events, "child.started")
    if started is None or not isinstance(started.get("epoch"), int):
        raise BenchError(f"the push started no epoch\n{log.tail()}")
    push.bad_epoch = int(str(started["epoch"]))
    serving = first(events, "child.serving", epoch=push.bad_epoch)
    failed = first(events, "health.failed", epoch=push.bad_epoch)
    if serving is None or failed is None:
        raise BenchError(f"no child.serving/health.failed for the bad epoch\n{log.tail()}")
    live = parse_ts(serving)
    check = failed.get("check")
    push.check = check if isinstance(check, str) else None
    push.push_to_bad_serving_s = live - push_wall
    push.detection_s = parse_ts(failed) - live
    if push.rollback:
        began = first(events, "rollback.started", epoch=push.bad_epoch)
        finished = first(events, "rollback.finished")
        if began is None or finished is None:
            raise BenchError(f"no rollback.started/finished\n{log.tail()}")
        push.rollback_started_s = parse_ts(began) - live
        push.bad_served_for_s = parse_ts(finished) - live
        push.finished_before_wrk_end = parse_ts(finished) < wrk_end
    else:
        push.served_until_wrk_end_s = wrk_end - live
    push.poll = analyse(samples, push_wall)
    push.push_to_good_s = push.poll.first_200_after_s
    return push


def write_script(family: BenchFamily) -> None:
    family.script.write_text(
        START_SCRIPT.format(envoy=family.envoy, config=family.config, base_id=family.base_id)
    )
    family.script.chmod(0o755)


def daemon_options(family: BenchFamily, state_dir: Path, *extra: str) -> list[str]:
    return [
        "--state-dir",
        str(state_dir),
        "--health-window",
        f"{HEALTH_WINDOW_S:g}",
        "--health-url",
        f"http://127.0.0.1:{family.listener_port}/",
        "--debounce",
        f"{DEBOUNCE_S:g}",
        # Not the shared default /run/envoy-autoreload/control.sock: nothing here uses it.
        "--no-control-socket",
        *extra,
    ]


def start_good(family: BenchFamily, options: list[str], body: str) -> DaemonLog:
    family.write_config(body)
    log = family.start(*options)
    family.wait_event("health.passed", timeout_s=START_TIMEOUT_S, epoch=0)
    family.wait_body(body)
    return log


def push_good(family: BenchFamily, body: str) -> None:
    """A new good config; its probation must pass (the next push rolls back to it)."""
    log = family.log
    assert log is not None
    mark = log.mark()
    family.write_config(body)
    started = family.wait_event("child.started", mark=mark, timeout_s=STEP_TIMEOUT_S)
    family.wait_event(
        "health.passed", mark=mark, timeout_s=STEP_TIMEOUT_S, epoch=started.get("epoch")
    )
    family.wait_body(body)


def run(
    envoy: Path, wrk_binary: str, pushes: int, seconds: int, no_rollback: bool
) -> tuple[list[Push], list[str], int]:
    family = BenchFamily(pick_base_id(*BASE_IDS), envoy=envoy)
    write_script(family)
    results: list[Push] = []
    options = daemon_options(family, family.tmp / "state")
    try:
        start_good(family, options, "good-0")
        for index in range(1, pushes + 1):
            push = push_once(
                family, Push(f"rollback #{index}", True, f"bad-{index}"), wrk_binary, seconds
            )
            results.append(push)
            print(f"  {line(push)}", flush=True)
            push_good(family, f"good-{index}")
        if no_rollback:
            family.stop()
            nr_options = daemon_options(family, family.tmp / "state-no-rollback", "--no-rollback")
            start_good(family, nr_options, "good-nr")
            push = push_once(family, Push("--no-rollback", False, "bad-nr"), wrk_binary, seconds)
            results.append(push)
            print(f"  {line(push)}", flush=True)
        return results, options, family.base_id
    finally:
        family.close()


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def line(p: Push) -> str:
    w = p.wrk
    assert w is not None
    return (
        f"[{p.label}] {w.requests:,} requests, {w.non_2xx_3xx:,} non-2xx,"
        f" {socket_errors(w)} socket errors; push→LIVE {ms(p.push_to_bad_serving_s)} ms,"
        f" detection {ms(p.detection_s)} ms, bad served {ms(p.bad_served_for_s)} ms,"
        f" push→good {ms(p.push_to_good_s)} ms"
    )


MEASURES: Final[dict[str, Callable[[Push], float | None]]] = {
    "non-2xx": lambda p: None if p.wrk is None else float(p.wrk.non_2xx_3xx),
    "requests": lambda p: None if p.wrk is None else float(p.wrk.requests),
    "socket errors": lambda p: None if p.wrk is None else float(socket_errors(p.wrk)),
    "push→bad LIVE (s)": lambda p: p.push_to_bad_serving_s,
    "detection (s)": lambda p: p.detection_s,
    "bad served for (s)": lambda p: p.bad_served_for_s,
    "push→good again (s)": lambda p: p.push_to_good_s,
}


def stats(pushes: list[Push]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, measure in MEASURES.items():
        values = [v for v in (measure(p) for p in pushes) if v is not None]
        if len(values) == len(pushes) and values:
            out[name] = summary(values)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--pushes", type=int, default=DEFAULT_PUSHES, help="bad pushes (5)")
    parser.add_argument("--seconds", type=int, default=DEFAULT_SECONDS, help="wrk per push (6)")
    parser.add_argument("--skip-no-rollback", action="store_true", help="no --no-rollback run")
    parser.add_argument("--envoy", type=Path, default=ENVOY_BIN, help="the Envoy binary")
    args = parser.parse_args()
    stop_on_sigterm()
    if args.pushes < 1 or args.seconds < 4:
        parser.error("--pushes >= 1 and --seconds >= 4")

    wrk_binary = ensure_wrk()
    env = environment(args.envoy)
    env["wrk"] = subprocess.run(
        [wrk_binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    began = time.monotonic()
    pushes, options, base_id = run(
        args.envoy, wrk_binary, args.pushes, args.seconds, not args.skip_no_rollback
    )
    elapsed = time.monotonic() - began
    rolled = [p for p in pushes if p.rollback]
    plain = [p for p in pushes if not p.rollback]

    print()
    print(
        f"A push that validates but answers 503, under wrk -t2 -c50 -d{args.seconds}s"
        f" (push {LEAD_S:g} s in); --health-window {HEALTH_WINDOW_S:g}, times in ms"
    )
    rows = []
    for p in pushes:
        w = p.wrk
        assert w is not None
        rows.append(
            [
                p.label,
                f"{w.requests:,}",
                f"{w.non_2xx_3xx:,}",
                f"{w.connect}/{w.read}/{w.write}/{w.timeout}",
                ms(p.push_to_bad_serving_s),
                ms(p.detection_s),
                ms(p.bad_served_for_s)
                if p.rollback
                else f"{ms(p.served_until_wrk_end_s)} (wrk end)",
                ms(p.push_to_good_s),
            ]
        )
    print(
        format_table(
            [
                "push",
                "requests",
                "non-2xx",
                "errors c/r/w/t",
                "push→bad LIVE",
                "detection",
                "bad served for",
                "push→good again",
            ],
            rows,
        )
    )
    summarised = stats(rolled)
    print()
    print(f"{len(rolled)} pushes with rollback: median / max")
    for name, st in summarised.items():
        scale, unit = (1000.0, " ms") if name.endswith("(s)") else (1.0, "")
        label = name.removesuffix(" (s)")
        print(f"  {label:<18} {st['median'] * scale:>10,.0f} / {st['max'] * scale:,.0f}{unit}")
    odd = [
        f"{p.label}: {p.poll.non_200_before_push} non-200 polls before the push"
        for p in pushes
        if p.poll is not None and p.poll.non_200_before_push
    ] + [
        f"{p.label}: rollback.finished after wrk ended (non-2xx undercounts)"
        for p in rolled
        if p.finished_before_wrk_end is False
    ]
    for note in odd:
        print(f"NOTE: {note}")
    print(f"\n{elapsed:.0f} s in all")
    path = write_results(
        "rollback",
        {
            "bench": "rollback",
            "wrk_args": [*WRK_ARGS, f"-d{args.seconds}s"],
            "lead_s": LEAD_S,
            "poll_interval_s": POLL_INTERVAL_S,
            "daemon_options": [o if not o.startswith("http") else "<health url>" for o in options],
            "base_id": base_id,
            "elapsed_s": round(elapsed, 1),
            "environment": env,
            "stats_with_rollback": {k: dict(v) for k, v in summarised.items()},
            "no_rollback": [p.to_json() for p in plain],
            "pushes": [p.to_json() for p in rolled],
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
