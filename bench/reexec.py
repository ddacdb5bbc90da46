"""Re-exec: the daemon re-executes itself in place, over and over, under load.

The daemon runs with `--state-dir` and `--control-socket` in a temp directory beside the
watched one, `--health-window 0` and `--log-format json`; the start script runs the
validated snapshot (`-c "${ENVOY_AUTORELOAD_SNAPSHOT:-...}"`, rollback.py's) with
`--drain-time-s 1 --parent-shutdown-time-s 2`, and the listener answers 200 from a
`direct_response`. Once epoch 0 serves:

- `wrk -t2 -c50 -d<seconds>s --latency` on 127.0.0.1 runs for the whole series, and a
  thread asks the listener every 10 ms over a NEW connection (rollback.py's poll), so
  accepting new connections is checked as well as wrk's kept-alive ones;
- `LEAD_S` in, `--reexecs` re-execs one after another: SIGUSR2 to the daemon's PID, then
  (bounded) its `daemon.adopted`, then the next SIGUSR2 at once;
- after wrk ends, a config change (new body) must be served by a new epoch (the daemon
  still watches and restarts), then SIGTERM must end the daemon with exit 0.

Per re-exec, from the daemon's JSON log (`ts`, ms): "self-test" (`reexec.requested` to
`daemon.reexec`: the quiet-moment wait, which is immediate here, and the new image's
`--self-test` child) and the "blind window" (`daemon.reexec` to `daemon.adopted`: the
exec, the new image's imports, the hand-over read; nobody watches the files or reaps
children meanwhile). Checked each time: the daemon's PID is the one we started and is
the same process (its /proc start time), `daemon.adopted` names the Envoy PID epoch 0
started with (and it is still alive), and no `reexec.refused`, `daemon.adoption_failed`
or `daemon.internal_error`. Totals: wrk's requests, non-2xx, socket errors.

The re-exec runs whatever `envoy_autoreload` is importable at that moment (the daemon
runs from the repository's root): a tree being edited meanwhile is measured as it is.

    .venv/bin/python bench/reexec.py [--reexecs 10] [--seconds 20]

Needs wrk (installs it with `apt-get install -y wrk` when root, as dropped.py does).
~25 s with the defaults. Prints a table and writes bench/results/reexec.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

# `python bench/reexec.py` puts bench/ first on sys.path, so the helpers import as-is.
from _common import (
    ENVOY_BIN,
    BenchError,
    BenchFamily,
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
from rollback import PollTrace, StatusPoller, analyse, first, socket_errors, write_script

# Ours alone: outage.py takes 50900-50999, rollback.py 50800-50899; dropped.py, idle.py
# and scale.py the whole of 50000-50999. pick_base_id() skips a base id whose shared
# memory exists, and run_all runs one script at a time.
BASE_IDS: Final = (50700, 50799)
LEAD_S: Final = 2.0  # wrk alone before the first SIGUSR2
START_TIMEOUT_S: Final = 60.0
STEP_TIMEOUT_S: Final = 30.0  # one re-exec: self-test + exec + adoption
DEFAULT_REEXECS: Final = 10
DEFAULT_SECONDS: Final = 20
# The old image's last line before the exec: `daemon.reexec` since 9370e84, `reexec.exec`
# before it (either is accepted, so the bench also runs against the older code).
EXEC_EVENTS: Final = ("daemon.reexec", "reexec.exec")
# Anything of these in the series is a failure of the re-exec, not a figure.
TROUBLE: Final = frozenset(
    {
        "reexec.refused",
        "daemon.adoption_failed",
        "daemon.internal_error",
        "child.exited",
        "child.died",
        "child.started",
        "restart.requested",
    }
)


def proc_start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: unchanged by exec, new for a reused PID."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass
class Step:
    index: int
    signal_wall: float = 0.0
    self_test_s: float | None = None  # reexec.requested -> daemon.reexec
    blind_s: float | None = None  # daemon.reexec -> daemon.adopted
    exec_to_started_s: float | None = None  # daemon.reexec -> the new image's daemon.started
    signal_to_adopted_s: float | None = None  # our SIGUSR2 (wall) -> daemon.adopted
    daemon_pid: int | None = None
    daemon_pid_same: bool | None = None
    envoy_pids: list[int] = field(default_factory=list)
    envoy_pid_same: bool | None = None
    version: str | None = None
    trouble: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return bool(self.daemon_pid_same and self.envoy_pid_same and not self.trouble)


@dataclass
class Series:
    reexecs: int
    seconds: int
    options: list[str]
    base_id: int = 0
    daemon_pid: int = 0
    daemon_start_time: int = 0  # /proc/PID/stat field 22 (clock ticks since boot)
    envoy_pid: int = 0
    steps: list[Step] = field(default_factory=list)
    wrk: WrkResult | None = None
    poll: PollTrace | None = None
    series_s: float | None = None  # first SIGUSR2 -> last daemon.adopted (wall)
    finished_before_wrk_end: bool | None = None
    push_served_s: float | None = None  # config rename -> new body served
    push_epoch: int | None = None
    exit_status: int | None = None
    envoy_gone_after_stop: bool | None = None

    def to_json(self) -> dict[str, Json]:
        out: dict[str, Json] = {
            k: v for k, v in dataclasses.asdict(self).items() if k not in ("wrk", "poll", "steps")
        }
        out["steps"] = [dataclasses.asdict(s) for s in self.steps]
        out["wrk"] = dataclasses.asdict(self.wrk) if self.wrk is not None else None
        out["socket_errors"] = None if self.wrk is None else socket_errors(self.wrk)
        out["poll"] = dataclasses.asdict(self.poll) if self.poll is not None else None
        return out


def daemon_options(tmp: Path) -> list[str]:
    return [
        "--state-dir",
        str(tmp / "state"),
        "--health-window",
        "0",
        "--control-socket",
        str(tmp / "ctl.sock"),
    ]


def reexec_once(family: BenchFamily, series: Series, index: int) -> Step:
    """SIGUSR2, `daemon.adopted` awaited; the step's times and checks from the log."""
    log = family.log
    process = family.process
    assert log is not None and process is not None
    step = Step(index)
    mark = log.mark()
    step.signal_wall = time.time()
    os.kill(series.daemon_pid, signal.SIGUSR2)
    adopted = family.wait_event("daemon.adopted", mark=mark, timeout_s=STEP_TIMEOUT_S)
    events = log.refresh()[mark:]
    requested = first(events, "reexec.requested")
    execed = next((e for e in events if e.get("event") in EXEC_EVENTS), None)
    started = first(events, "daemon.started")
    if requested is None or execed is None:
        raise BenchError(f"re-exec #{index}: no reexec.requested/daemon.reexec\n{log.tail()}")
    step.self_test_s = parse_ts(execed) - parse_ts(requested)
    step.blind_s = parse_ts(adopted) - parse_ts(execed)
    if started is not None:
        step.exec_to_started_s = parse_ts(started) - parse_ts(execed)
    step.signal_to_adopted_s = parse_ts(adopted) - step.signal_wall
    # The new image's `daemon.started` carries its PID: the one we started, as our
    # Popen's, alive, and the same process (a reused PID would have a new start time).
    started_pid = None if started is None else started.get("pid")
    step.daemon_pid = started_pid if isinstance(started_pid, int) else None
    step.daemon_pid_same = (
        step.daemon_pid == series.daemon_pid
        and process.pid == series.daemon_pid
        and process.poll() is None
        and proc_start_time(process.pid) == series.daemon_start_time
    )
    pids = adopted.get("pids")
    step.envoy_pids = [p for p in pids if isinstance(p, int)] if isinstance(pids, list) else []
    step.envoy_pid_same = step.envoy_pids == [series.envoy_pid] and family.owns(series.envoy_pid)
    version = adopted.get("version")
    step.version = version if isinstance(version, str) else None
    step.trouble = [str(e.get("event")) for e in events if e.get("event") in TROUBLE]
    return step


def push_after(family: BenchFamily, series: Series) -> None:
    """A config change after the series: a new epoch must serve its body."""
    log = family.log
    assert log is not None
    mark = log.mark()
    pushed = time.monotonic()
    family.write_config("after-reexecs")
    served = family.wait_body("after-reexecs", timeout_s=STEP_TIMEOUT_S)
    series.push_served_s = served - pushed
    serving = family.wait_event("child.serving", mark=mark, timeout_s=STEP_TIMEOUT_S)
    epoch = serving.get("epoch")
    series.push_epoch = epoch if isinstance(epoch, int) else None


def run(envoy: Path, wrk_binary: str, series: Series) -> Series:
    family = BenchFamily(pick_base_id(*BASE_IDS), envoy=envoy)
    series.base_id = family.base_id
    write_script(family)
    series.options = daemon_options(family.tmp)
    wrk = Wrk(wrk_binary, f"http://127.0.0.1:{family.listener_port}/", series.seconds)
    poller = StatusPoller(family.listener_port)
    try:
        family.write_config("v0")
        family.start(*series.options)
        process = family.process
        assert process is not None
        series.daemon_pid = process.pid
        series.daemon_start_time = proc_start_time(process.pid)
        serving = family.wait_event("child.serving", timeout_s=START_TIMEOUT_S, epoch=0)
        family.wait_body("v0")
        pid = serving.get("pid")
        if not isinstance(pid, int):
            raise BenchError(f"child.serving without a pid: {serving}")
        series.envoy_pid = pid
        print(
            f"  daemon PID {series.daemon_pid}, Envoy PID {pid}; wrk {series.seconds} s,"
            f" {series.reexecs} re-execs from {LEAD_S:g} s in",
            flush=True,
        )
        poller.start()
        wrk.start()
        time.sleep(LEAD_S)
        began = time.time()
        for index in range(1, series.reexecs + 1):
            step = reexec_once(family, series, index)
            series.steps.append(step)
            print(f"  {line(step)}", flush=True)
        ended = time.time()
        series.series_s = ended - began
        series.wrk = wrk.result()
        wrk_end = time.time()
        series.finished_before_wrk_end = ended < wrk_end - 0.5
        series.poll = analyse(poller.stop(), began)
        push_after(family, series)
        print(
            f"  after the series: a config change served {ms(series.push_served_s)} ms"
            f" after the rename (epoch {series.push_epoch})",
            flush=True,
        )
        series.exit_status = family.stop()
        series.envoy_gone_after_stop = not family.owns(series.envoy_pid)
        return series
    finally:
        wrk.kill()
        poller.stop()
        family.close()


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def line(s: Step) -> str:
    checks = "ok" if s.ok() else f"FAILED {s.trouble or ''}"
    return (
        f"[re-exec #{s.index}] self-test {ms(s.self_test_s)} ms, blind {ms(s.blind_s)} ms,"
        f" SIGUSR2→adopted {ms(s.signal_to_adopted_s)} ms; daemon PID {s.daemon_pid},"
        f" Envoy {s.envoy_pids}: {checks}"
    )


def stats(steps: list[Step]) -> dict[str, dict[str, float]]:
    measures: dict[str, list[float | None]] = {
        "self-test (s)": [s.self_test_s for s in steps],
        "blind window (s)": [s.blind_s for s in steps],
        "exec→daemon.started (s)": [s.exec_to_started_s for s in steps],
        "SIGUSR2→adopted (s)": [s.signal_to_adopted_s for s in steps],
    }
    out: dict[str, dict[str, float]] = {}
    for name, raw in measures.items():
        values = [v for v in raw if v is not None]
        if values and len(values) == len(raw):
            out[name] = summary(values)
    return out


def report(series: Series, summarised: dict[str, dict[str, float]], elapsed: float) -> None:
    w = series.wrk
    assert w is not None
    print()
    print(
        f"{len(series.steps)} re-execs by SIGUSR2 under wrk -t2 -c50 -d{series.seconds}s"
        f" (first {LEAD_S:g} s in), --health-window 0; times in ms"
    )
    rows = [
        [
            f"#{s.index}",
            ms(s.self_test_s),
            ms(s.blind_s),
            ms(s.exec_to_started_s),
            ms(s.signal_to_adopted_s),
            "yes" if s.daemon_pid_same else "NO",
            "yes" if s.envoy_pid_same else "NO",
            ", ".join(s.trouble) or "-",
        ]
        for s in series.steps
    ]
    header = [
        "re-exec",
        "self-test",
        "blind window",
        "exec→started",
        "SIGUSR2→adopted",
        "daemon PID same",
        "Envoy PID same",
        "trouble",
    ]
    print(format_table(header, rows))
    print()
    print("median / max")
    for name, st in summarised.items():
        label = name.removesuffix(" (s)")
        print(f"  {label:<24} {st['median'] * 1000:>6,.0f} / {st['max'] * 1000:,.0f} ms")
    poll = series.poll
    print(
        f"wrk: {w.requests:,} requests ({w.rps:,.0f}/s), {w.non_2xx_3xx:,} non-2xx, socket"
        f" errors c/r/w/t {w.connect}/{w.read}/{w.write}/{w.timeout}, p99"
        f" {w.p99_s * 1000:.2f} ms, max {w.max_s * 1000:.1f} ms"
    )
    if poll is not None:
        print(
            f"poll (new connection every 10 ms): {poll.polls} after the first SIGUSR2,"
            f" {poll.no_answer} unanswered, {poll.answered_503 + poll.other} not 200"
        )
    series_s = series.series_s or 0.0
    print(
        f"series {series_s:.1f} s (ended {'before' if series.finished_before_wrk_end else 'AFTER'}"
        f" wrk); then a config change served in {ms(series.push_served_s)} ms by epoch"
        f" {series.push_epoch}; SIGTERM: exit {series.exit_status},"
        f" Envoy {'gone' if series.envoy_gone_after_stop else 'STILL ALIVE'}"
    )
    print(f"\n{elapsed:.0f} s in all")


def verdict(series: Series) -> list[str]:
    w = series.wrk
    problems = [f"re-exec #{s.index}: {line(s)}" for s in series.steps if not s.ok()]
    if w is not None and w.errors:
        problems.append(f"wrk saw {w.non_2xx_3xx} non-2xx and {socket_errors(w)} socket errors")
    if series.poll is not None and (
        series.poll.no_answer or series.poll.answered_503 or series.poll.other
    ):
        problems.append("the new-connection poll saw answers other than 200")
    if not series.finished_before_wrk_end:
        problems.append("the series did not end before wrk did: raise --seconds")
    if series.exit_status != 0:
        problems.append(f"SIGTERM: the daemon exited {series.exit_status}, not 0")
    if not series.envoy_gone_after_stop:
        problems.append("Envoy outlived the daemon's SIGTERM")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument(
        "--reexecs", type=int, default=DEFAULT_REEXECS, help="re-execs in the series (10)"
    )
    parser.add_argument(
        "--seconds", type=int, default=DEFAULT_SECONDS, help="wrk for the series (20)"
    )
    parser.add_argument("--envoy", type=Path, default=ENVOY_BIN, help="the Envoy binary")
    args = parser.parse_args()
    stop_on_sigterm()
    if args.reexecs < 1 or args.seconds < LEAD_S + 2:
        parser.error("--reexecs >= 1 and --seconds >= 4")

    wrk_binary = ensure_wrk()
    env = environment(args.envoy)
    env["wrk"] = subprocess.run(
        [wrk_binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    began = time.monotonic()
    series = run(args.envoy, wrk_binary, Series(args.reexecs, args.seconds, []))
    elapsed = time.monotonic() - began
    summarised = stats(series.steps)
    report(series, summarised, elapsed)
    problems = verdict(series)
    for problem in problems:
        print(f"NOTE: {problem}")
    path = write_results(
        "reexec",
        {
            "bench": "reexec",
            "wrk_args": [*WRK_ARGS, f"-d{args.seconds}s"],
            "lead_s": LEAD_S,
            "daemon_options": [*series.options],
            "elapsed_s": round(elapsed, 1),
            "environment": env,
            "stats": {k: dict(v) for k, v in summarised.items()},
            "problems": list(problems),
            "series": series.to_json(),
        },
    )
    print(f"wrote {path}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
