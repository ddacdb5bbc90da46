"""Idle cost: what watching 1,000 files costs while nothing changes.

A tree of 1,000 small files (100 per directory, three levels, as in scale.py) sits in
the watched family directory. Three subjects, one after the other, each idle for
`--seconds` (60 by default) once settled (`SETTLE_S` after start-up):

- `envoy-autoreload` (inotify, the default on Linux), Envoy serving epoch 0;
- `envoy-autoreload --watcher watchdog`, Envoy serving epoch 0;
- a plain `watchdog` Observer in a child Python process: the same directory scheduled
  recursively with a no-op handler, nothing else (no Envoy).

For each, from /proc over the idle window: CPU seconds (utime + stime of the whole
process, every thread, over SC_CLK_TCK), voluntary context switches (the wakeups: a
thread that sleeps and is woken) and involuntary ones, summed over every thread in
/proc/PID/task/*/status (the leader thread's own figure, which is all /proc/PID/status
shows, is kept too), RSS at the end, threads, and the inotify watches held (fdinfo).
For the daemons, the serving Envoy's own CPU over the same window is shown as context:
it is not the daemon's cost.

    .venv/bin/python bench/idle.py [--seconds 60]

Prints a table and writes bench/results/idle.json (raw figures + environment).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# `python bench/idle.py` puts bench/ first on sys.path, so the helper imports as-is.
from _common import (
    CLK_TCK,
    ENVOY_BIN,
    BenchError,
    BenchFamily,
    Json,
    build_tree,
    cpu_seconds,
    environment,
    format_table,
    inotify_watches,
    pick_base_id,
    proc_status,
    status_kb,
    stop_on_sigterm,
    thread_count,
    thread_switches,
    write_results,
)

BASE_IDS: Final = (50000, 50999)
FILES: Final = 1_000
SETTLE_S: Final = 3.0
START_TIMEOUT_S: Final = 60.0

# The plain observer: exactly what a watchdog user writes, nothing more.
OBSERVER: Final = """\
import sys, time
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

class NoOp(FileSystemEventHandler):
    pass

observer = Observer()
observer.schedule(NoOp(), sys.argv[1], recursive=True)
observer.start()
print(type(observer).__name__, flush=True)
while True:
    time.sleep(3600)
"""


@dataclass(frozen=True, slots=True)
class Idle:
    subject: str
    seconds: float  # the measured window, wall clock
    cpu_s: float
    voluntary: int  # every thread
    nonvoluntary: int  # every thread
    voluntary_leader: int  # /proc/PID/status alone: the main thread
    rss_kb_before: int
    rss_kb: int
    threads: int
    watches_fdinfo: int
    envoy_cpu_s: float | None  # the serving Envoy over the same window (context)
    detail: Json


def measure(subject: str, pid: int, seconds: float, envoy_pid: int | None, detail: Json) -> Idle:
    cpu0 = cpu_seconds(pid)
    switches0 = thread_switches(pid)
    leader0 = int(proc_status(pid)["voluntary_ctxt_switches"])
    rss0 = status_kb(pid, "VmRSS")
    envoy0 = cpu_seconds(envoy_pid) if envoy_pid is not None else None
    began = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - began
    cpu1 = cpu_seconds(pid)
    switches1 = thread_switches(pid)
    leader1 = int(proc_status(pid)["voluntary_ctxt_switches"])
    envoy1 = cpu_seconds(envoy_pid) if envoy_pid is not None else None
    # Threads that came meanwhile count from zero; threads that went are lost (rare).
    voluntary = sum(v - switches0.get(tid, (0, 0))[0] for tid, (v, _) in switches1.items())
    nonvoluntary = sum(n - switches0.get(tid, (0, 0))[1] for tid, (_, n) in switches1.items())
    return Idle(
        subject=subject,
        seconds=elapsed,
        cpu_s=cpu1 - cpu0,
        voluntary=voluntary,
        nonvoluntary=nonvoluntary,
        voluntary_leader=leader1 - leader0,
        rss_kb_before=rss0,
        rss_kb=status_kb(pid, "VmRSS"),
        threads=thread_count(pid),
        watches_fdinfo=inotify_watches(pid),
        envoy_cpu_s=None if envoy0 is None or envoy1 is None else envoy1 - envoy0,
        detail=detail,
    )


def idle_daemon(subject: str, seconds: float, envoy: Path, *options: str) -> Idle:
    family = BenchFamily(pick_base_id(*BASE_IDS), envoy=envoy)
    try:
        build_tree(family.root / "tree", FILES)
        family.write_config("idle-v0")
        family.start(*options)
        watch = family.wait_event("watch.started", timeout_s=START_TIMEOUT_S)
        serving = family.wait_event("child.serving", timeout_s=START_TIMEOUT_S, epoch=0)
        family.wait_body("idle-v0")
        assert family.log is not None
        generations = family.log.since(0, "generations.on")
        if generations and generations[0].get("health_window_s"):
            # Probation checks every 0.5 s for --health-window: measure after it. (Not
            # "health.probation" seen by now: it may be logged a moment after LIVE.)
            family.wait_event("health.passed", timeout_s=START_TIMEOUT_S)
        time.sleep(SETTLE_S)
        process = family.process
        assert process is not None and family.log is not None
        envoy_pid = serving.get("pid")
        mark = family.log.mark()
        print(f"  {subject}: idle for {seconds:g} s ...", flush=True)
        result = measure(
            subject,
            process.pid,
            seconds,
            envoy_pid if isinstance(envoy_pid, int) else None,
            {
                "options": list(options),
                "watch_started": {k: watch.get(k) for k in ("directories", "files", "watches")},
            },
        )
        if process.poll() is not None:
            raise BenchError(f"daemon exited ({process.returncode}) while idle")
        logged = [e.get("event") for e in family.log.refresh()[mark:]]
        if logged:
            print(f"  NOTE: the daemon logged while idle: {logged}")
        assert isinstance(result.detail, dict)
        result.detail["events_while_idle"] = list(logged)
        return result
    finally:
        family.close()


def idle_observer(seconds: float) -> Idle:
    tmp = Path(tempfile.mkdtemp(prefix="autoreload-bench-"))
    process: subprocess.Popen[str] | None = None
    try:
        root = tmp / "family"
        build_tree(root / "tree", FILES)
        process = subprocess.Popen(
            [sys.executable, "-c", OBSERVER, str(root)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert process.stdout is not None
        kind = process.stdout.readline().strip()  # blocks until the observer runs
        if not kind:
            raise BenchError(f"the watchdog observer did not start ({process.wait()})")
        time.sleep(SETTLE_S)
        subject = f"watchdog {kind} alone"
        print(f"  {subject}: idle for {seconds:g} s ...", flush=True)
        return measure(subject, process.pid, seconds, None, {"observer": kind})
    finally:
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="idle window (default 60)")
    parser.add_argument("--envoy", type=Path, default=ENVOY_BIN, help="the Envoy binary")
    args = parser.parse_args()
    stop_on_sigterm()
    if args.seconds <= 0:
        parser.error("--seconds must be positive")

    env = environment(args.envoy)
    env["clk_tck"] = CLK_TCK
    results = [
        idle_daemon("envoy-autoreload (inotify)", args.seconds, args.envoy),
        idle_daemon(
            "envoy-autoreload --watcher watchdog",
            args.seconds,
            args.envoy,
            "--watcher",
            "watchdog",
        ),
        idle_observer(args.seconds),
    ]

    rows = [
        [
            r.subject,
            f"{r.cpu_s:.2f}",
            f"{r.cpu_s / r.seconds * 100:.2f}",
            str(r.voluntary),
            f"{r.voluntary / r.seconds:.1f}",
            str(r.voluntary_leader),
            str(r.nonvoluntary),
            f"{r.rss_kb / 1024:.1f}",
            str(r.threads),
            str(r.watches_fdinfo),
            "-" if r.envoy_cpu_s is None else f"{r.envoy_cpu_s:.2f}",
        ]
        for r in results
    ]
    print()
    print(
        f"Idle cost over {args.seconds:g} s with {FILES:,} files watched "
        f"(CPU in 1/{CLK_TCK} s ticks; switches summed over threads)"
    )
    print(
        format_table(
            [
                "subject",
                "CPU s",
                "CPU %",
                "voluntary",
                "per s",
                "main thread",
                "involuntary",
                "RSS MiB",
                "threads",
                "watches",
                "Envoy CPU s",
            ],
            rows,
        )
    )
    path = write_results(
        "idle",
        {
            "bench": "idle",
            "seconds": args.seconds,
            "files": FILES,
            "environment": env,
            "subjects": [dataclasses.asdict(r) for r in results],
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
