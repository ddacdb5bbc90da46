"""Outage: how long clients see no proxy when an Envoy dies and the daemon recovers.

A thread polls 127.0.0.1:<listener> every ~2 ms over a NEW connection each time
(`Connection: close`) and records (monotonic time of the answer, ok or failed); ok is a
200 with the config's body. The outage is from the last successful answer before the
first failure to the first successful answer after it; the failed requests in between
are counted too. Three scenarios, each with a FRESH daemon per repetition: the daemon
backs off 1, 2, 4 s on repeated deaths and exits 1 at the 5th within 5 minutes (the
crash budget), and each repetition should measure a first death.

- serving_killed: SIGKILL the serving Envoy (epoch 0, the only process; its PID from
  the daemon's `child.serving`). The daemon cold-starts epoch 0 at once.
- drain_cut: SIGHUP, and once epoch 1 serves (0.3 s after its `child.serving`) SIGKILL
  the draining epoch 0. Envoy aborts epoch 1 about parent-shutdown + 10 s after it went
  LIVE (ENVOY_FACTS §6); the daemon cold-starts epoch 0 the moment it dies. The outage
  is the one around that abort; we also time the kill to the abort. ~15 s each.
- respawn: SIGHUP, then SIGKILL the NEW serving epoch 1 (0.3 s after its
  `child.serving`) while epoch 0 still drains. The daemon respawns epoch 1 from the
  draining parent. We keep polling until epoch 0 has exited, to see that hand-over too.

The start script runs Envoy with `--drain-time-s 1 --parent-shutdown-time-s 2`.

    .venv/bin/python bench/outage.py [--repeats N] [--scenarios serving_killed ...]

`--repeats` sets every scenario's count (defaults: serving_killed 10, drain_cut 3,
respawn 10). ~1.5 minutes with the defaults. Prints a table per scenario and writes
bench/results/outage.json (raw samples, the poll trace as runs, daemon events).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

# `python bench/outage.py` puts bench/ first on sys.path, so the helper imports as-is.
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
    summary,
    wait_for,
    write_results,
)

# latency.py and storm.py take the two halves of 50000-50999, and dropped.py, idle.py
# and scale.py the whole of it; no slice is free of all of them. pick_base_id() skips a
# base id whose shared memory exists, and run_all runs one script at a time.
BASE_IDS: Final = (50900, 50999)
BODY: Final = "outage"
POLL_INTERVAL_S: Final = 0.002
BASELINE_S: Final = 0.2  # polls before the kill: the proxy answers
SETTLE_S: Final = 0.3  # after the new epoch's child.serving, before the kill
TAIL_S: Final = 0.5  # polls after the recovery, to see any later failure
START_TIMEOUT_S: Final = 60.0
STEP_TIMEOUT_S: Final = 30.0
ABORT_TIMEOUT_S: Final = 40.0  # drain_cut: the abort comes ~12 s after the kill
DEFAULT_REPEATS: Final = {"serving_killed": 10, "drain_cut": 3, "respawn": 10}
TIMELINE_EVENTS: Final = frozenset(
    {
        "restart.requested",
        "child.started",
        "child.serving",
        "child.draining",
        "child.exited",
        "child.died",
        "child.drain_cut",
        "restart.recovery_scheduled",
        "restart.full",
        "restart.failed",
        "hot_restart.flag_cleared",
        "child.stopping_orphan",
        "child.killing_orphan",
        "daemon.crash_budget_exhausted",
    }
)


# -- the poller ----------------------------------------------------------------------
@dataclass
class Poller:
    """A thread asking the listener every ~2 ms, new connection each time."""

    port: int
    body: bytes
    samples: list[tuple[float, bool]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ok = fetch_body(self.port) == self.body
            self.samples.append((time.monotonic(), ok))  # list.append: atomic
            self._stop.wait(POLL_INTERVAL_S)

    def stop(self) -> list[tuple[float, bool]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return list(self.samples)

    def wait_ok_after(self, since: float, timeout_s: float = STEP_TIMEOUT_S) -> float:
        """The first successful answer later than `since` (monotonic)."""

        def found() -> float | None:
            hits = [t for t, ok in self.samples[-200:] if ok and t > since]
            return hits[0] if hits else None

        return wait_for(found, timeout_s=timeout_s, what="a successful answer")


@dataclass(frozen=True, slots=True)
class Trace:
    """The poll record around the kill, times in s relative to it."""

    outage_s: float  # 0 when no request failed
    failed: int  # failed requests in the first outage
    failed_before_kill: int  # e.g. during the SIGHUP hot restart: 0 expected
    later_failed: int  # failed after the first recovery, until the poll stopped
    max_ok_gap_s: float  # longest interval between successes from the kill on (>= outage)
    polls: int
    last_ok_before_s: float | None
    first_fail_s: float | None
    first_ok_after_s: float | None
    runs: list[list[float | int | bool]]  # [first_s, last_s, ok, count] per run of equals


def analyse(samples: list[tuple[float, bool]], kill_at: float) -> Trace:
    before = [ok for t, ok in samples if t < kill_at]
    after = [(t - kill_at, ok) for t, ok in samples if t >= kill_at]
    # From the last success before the kill on: the longest gap is at least the outage.
    prior_oks = [t - kill_at for t, ok in samples if ok and t < kill_at]
    oks = prior_oks[-1:] + [t for t, ok in after if ok]
    gaps = [b - a for a, b in itertools.pairwise(oks)]
    first_fail = next((i for i, (_, ok) in enumerate(after) if not ok), None)
    last_ok = first_ok = None
    failed = later = 0
    if first_fail is not None:
        previous = prior_oks[-1:] + [t for t, ok in after[:first_fail] if ok]
        last_ok = previous[-1] if previous else None
        recovered = next((i for i in range(first_fail, len(after)) if after[i][1]), None)
        if recovered is not None:
            first_ok = after[recovered][0]
            failed = recovered - first_fail
            later = sum(1 for _, ok in after[recovered:] if not ok)
        else:
            failed = len(after) - first_fail
    runs: list[list[float | int | bool]] = []
    for t, ok in samples:
        rel = round(t - kill_at, 4)
        if runs and runs[-1][2] == ok:
            runs[-1][1] = rel
            runs[-1][3] = int(runs[-1][3]) + 1
        else:
            runs.append([rel, rel, ok, 1])
    if first_fail is not None and (last_ok is None or first_ok is None):
        raise BenchError(f"the poll never saw the outage's both ends: {runs}")
    return Trace(
        outage_s=0.0 if first_ok is None or last_ok is None else first_ok - last_ok,
        failed=failed,
        failed_before_kill=sum(1 for ok in before if not ok),
        later_failed=later,
        max_ok_gap_s=max(gaps, default=0.0),
        polls=len(after),
        last_ok_before_s=last_ok,
        first_fail_s=None if first_fail is None else after[first_fail][0],
        first_ok_after_s=first_ok,
        runs=runs,
    )


# -- one repetition ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Sample:
    scenario: str
    repetition: int
    killed_epoch: int
    killed_pid: int
    recovered_epoch: int
    recovered_pid: int
    trace: Trace
    kill_to_died_s: float  # kill until `child.died` logged (drain_cut: the abort)
    died_to_started_s: float  # `child.died` until the recovery's `child.started`
    startup_s: float  # the recovery's `child.serving` startup_s (spawn to LIVE)
    serving_to_ok_s: float  # `child.serving` logged until our first success after it
    abort_after_live_s: float | None  # drain_cut: the abort after epoch 1's LIVE
    recovery_delay_s: float | None  # `restart.recovery_scheduled` in_s
    daemon_exit: int | None
    events: list[dict[str, Json]]

    def measure(self, name: str) -> float:
        value = MEASURES[name](self)
        if value is None:
            raise BenchError(f"{name} is not measured in {self.scenario}")
        return value


MEASURES: Final[dict[str, Callable[[Sample], float | None]]] = {
    "outage": lambda s: s.trace.outage_s,
    "failed requests": lambda s: s.trace.failed,
    "longest gap between oks": lambda s: s.trace.max_ok_gap_s,
    "kill→abort (poll)": lambda s: s.trace.first_fail_s,
    "abort after epoch 1 LIVE": lambda s: s.abort_after_live_s,
    "kill→child.died logged": lambda s: s.kill_to_died_s,
    "child.died→child.started": lambda s: s.died_to_started_s,
    "Envoy start (startup_s)": lambda s: s.startup_s,
    "serving logged→first ok": lambda s: s.serving_to_ok_s,
}
SCENARIO_MEASURES: Final = {
    "serving_killed": [m for m in MEASURES if not m.startswith(("kill→abort", "abort"))],
    "drain_cut": list(MEASURES),
    "respawn": [m for m in MEASURES if not m.startswith(("kill→abort", "abort"))],
}


def event_pid(event: Event) -> int:
    pid = event.get("pid")
    if not isinstance(pid, int):
        raise BenchError(f"event without a pid: {event}")
    return pid


def compact(event: Event, zero: float) -> dict[str, Json]:
    keep = ("event", "epoch", "pid", "reason", "status", "in_s", "startup_s", "serving_epoch")
    out: dict[str, Json] = {"t": round(parse_ts(event) - zero, 3)}
    out.update({k: event[k] for k in keep if k in event and event[k] is not None})
    return out


def start_daemon(family: BenchFamily) -> Event:
    family.start()
    serving = family.wait_event("child.serving", timeout_s=START_TIMEOUT_S, epoch=0)
    family.wait_body(BODY)
    return serving


def hot_restart(family: BenchFamily) -> Event:
    """SIGHUP the daemon; epoch 1's `child.serving` (after SETTLE_S)."""
    assert family.process is not None and family.log is not None
    mark = family.log.mark()
    family.process.send_signal(signal.SIGHUP)
    serving = family.wait_event("child.serving", mark=mark, timeout_s=STEP_TIMEOUT_S, epoch=1)
    family.wait_event("child.draining", mark=mark, timeout_s=STEP_TIMEOUT_S, epoch=0)
    time.sleep(SETTLE_S)
    return serving


def kill(family: BenchFamily, pid: int) -> tuple[float, float]:
    """SIGKILL our Envoy `pid`; (monotonic, wall) just before."""
    if not family.owns(pid):
        raise BenchError(f"PID {pid} is not an Envoy of base id {family.base_id}")
    at, wall = time.monotonic(), time.time()
    os.kill(pid, signal.SIGKILL)
    return at, wall


def repetition(family: BenchFamily, scenario: str, index: int) -> Sample:
    """A fresh daemon, one kill, the recovery; the daemon is stopped again."""
    first = start_daemon(family)
    log = family.log
    assert log is not None
    poller = Poller(family.listener_port, BODY.encode())
    poller.start()
    try:
        time.sleep(BASELINE_S)
        live_1: Event | None = None
        if scenario == "serving_killed":
            victim = first
        else:
            live_1 = hot_restart(family)
            victim = first if scenario == "drain_cut" else live_1
        victim_epoch = victim.get("epoch")
        assert isinstance(victim_epoch, int)
        victim_pid = event_pid(victim)
        mark = log.mark()
        kill_at, kill_wall = kill(family, victim_pid)

        if scenario == "drain_cut":
            family.wait_event("child.drain_cut", mark=mark, timeout_s=STEP_TIMEOUT_S, epoch=0)
            died = family.wait_event("child.died", mark=mark, timeout_s=ABORT_TIMEOUT_S, epoch=1)
        else:
            died = family.wait_event(
                "child.died", mark=mark, timeout_s=STEP_TIMEOUT_S, epoch=victim_epoch
            )
        recovered_epoch = 1 if scenario == "respawn" else 0
        serving = family.wait_event(
            "child.serving", mark=mark, timeout_s=STEP_TIMEOUT_S, epoch=recovered_epoch
        )
        poller.wait_ok_after(time.monotonic())
        if scenario == "respawn":
            # The draining epoch 0 ends 2 s after the respawned epoch 1 is LIVE.
            family.wait_event("child.exited", mark=mark, timeout_s=STEP_TIMEOUT_S, epoch=0)
        time.sleep(TAIL_S)
    finally:
        samples = poller.stop()
    started = log.since(mark, "child.started", epoch=recovered_epoch)
    scheduled = log.since(mark, "restart.recovery_scheduled")
    events = [compact(e, kill_wall) for e in log.refresh() if e.get("event") in TIMELINE_EVENTS]
    daemon_exit = family.stop()

    trace = analyse(samples, kill_at)
    if trace.first_ok_after_s is None:
        # No request failed: "first ok" is the first after the recovery was logged.
        first_ok_wall = kill_wall + next(t - kill_at for t, ok in samples if ok and t > kill_at)
    else:
        first_ok_wall = kill_wall + trace.first_ok_after_s
    startup = serving.get("startup_s")
    if not started or not isinstance(startup, int | float):
        raise BenchError(f"no recovery start logged\n{log.tail()}")
    delay = scheduled[0].get("in_s") if scheduled else None
    return Sample(
        scenario=scenario,
        repetition=index,
        killed_epoch=victim_epoch,
        killed_pid=victim_pid,
        recovered_epoch=recovered_epoch,
        recovered_pid=event_pid(serving),
        trace=trace,
        kill_to_died_s=parse_ts(died) - kill_wall,
        died_to_started_s=parse_ts(started[0]) - parse_ts(died),
        startup_s=float(startup),
        serving_to_ok_s=first_ok_wall - parse_ts(serving),
        abort_after_live_s=(
            parse_ts(died) - parse_ts(live_1) if scenario == "drain_cut" and live_1 else None
        ),
        recovery_delay_s=float(delay) if isinstance(delay, int | float) else None,
        daemon_exit=daemon_exit,
        events=events,
    )


@dataclass
class Scenario:
    name: str
    repeats: int
    base_id: int = 0
    samples: list[Sample] = field(default_factory=list)

    def stats(self) -> dict[str, dict[str, float]]:
        return {
            m: summary([s.measure(m) for s in self.samples]) for m in SCENARIO_MEASURES[self.name]
        }

    def to_json(self) -> dict[str, Json]:
        return {
            "scenario": self.name,
            "repeats": self.repeats,
            "fresh_daemon_each_repetition": True,
            "base_id": self.base_id,
            "stats": {m: dict(v) for m, v in self.stats().items()},
            "samples": [dataclasses.asdict(s) for s in self.samples],
        }


def run(scenario: Scenario, envoy: Path) -> Scenario:
    """One family for the scenario, a fresh daemon per repetition. Always cleans up."""
    family = BenchFamily(pick_base_id(*BASE_IDS), envoy=envoy)
    scenario.base_id = family.base_id
    try:
        family.write_config(BODY)
        for index in range(1, scenario.repeats + 1):
            sample = repetition(family, scenario.name, index)
            scenario.samples.append(sample)
            t = sample.trace
            extra = f", kill→abort {t.first_fail_s:.2f} s" if scenario.name == "drain_cut" else ""
            print(
                f"  [{scenario.name}] {index:>2}/{scenario.repeats}: outage"
                f" {t.outage_s * 1000:6.1f} ms, {t.failed} failed{extra}"
                + (f", {t.later_failed} LATER failures" if t.later_failed else ""),
                flush=True,
            )
        return scenario
    finally:
        family.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument(
        "--repeats", type=int, help="repetitions of every scenario (default 10, 3, 10)"
    )
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=list(DEFAULT_REPEATS),
        default=list(DEFAULT_REPEATS),
        help="which to run (default: all three)",
    )
    parser.add_argument("--envoy", type=Path, default=ENVOY_BIN, help="the Envoy binary")
    args = parser.parse_args()
    stop_on_sigterm()
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")

    env = environment(args.envoy)
    began = time.monotonic()
    scenarios = [
        run(Scenario(name, args.repeats or DEFAULT_REPEATS[name]), args.envoy)
        for name in args.scenarios
    ]
    elapsed = time.monotonic() - began

    header = ["measure", "median", "p95", "min", "max"]
    for scenario in scenarios:
        rows = [
            [
                measure,
                *(
                    f"{st[k]:g}" if measure == "failed requests" else f"{st[k] * 1000:.1f}"
                    for k in ("median", "p95", "min", "max")
                ),
            ]
            for measure, st in scenario.stats().items()
        ]
        print()
        print(
            f"{scenario.name}: {scenario.repeats} repetitions, a fresh daemon each"
            " (ms; failed requests as counts)"
        )
        print(format_table(header, rows))
        odd = [
            f"#{s.repetition}: {s.trace.failed_before_kill} before the kill, "
            f"{s.trace.later_failed} after the recovery, daemon exit {s.daemon_exit}"
            for s in scenario.samples
            if s.trace.failed_before_kill or s.trace.later_failed or s.daemon_exit
        ]
        for line in odd:
            print(f"NOTE: {line}")
    print(f"\n{elapsed:.0f} s in all")
    path = write_results(
        "outage",
        {
            "bench": "outage",
            "poll_interval_s": POLL_INTERVAL_S,
            "settle_s": SETTLE_S,
            "elapsed_s": round(elapsed, 1),
            "environment": env,
            "scenarios": [s.to_json() for s in scenarios],
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
