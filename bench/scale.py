"""Scale of watching: start-up time, RSS and inotify watches for 1,000 to 100,000 files.

For each size a tree of small files is built inside the watched family directory, 100
files per directory, three levels (`tree/aNNN/bNN/fNN.json`, 10 leaf directories per
top one: 100,000 files are 1,000 leaf directories under 100 top ones). Then:

- `envoy-autoreload --check` with the same options, timed (a fresh Python: imports,
  `envoy --version` and `--hot-restart-version`, validation, walking the tree, inotify
  limits; it starts nothing);
- the daemon, `--repeats` times, each a fresh process on the same tree (the page cache
  is warm: the tree was just written). From the moment before it is spawned:
  `daemon.started` logged (interpreter and imports), `validation.passed` (the binary
  checks and `envoy --mode validate`, which come before watching), `watch.started`
  logged (walking, digesting and adding the watches), epoch 0 `child.serving` logged,
  and, polled on its own from the spawn on, the listener serving the config's body.
  One second after LIVE: the daemon's VmRSS and VmHWM (/proc/PID/status), its CPU
  seconds so far, and the inotify watches it holds (`inotify wd:` lines in
  /proc/PID/fdinfo, beside the `watches` field of `watch.started`).

Size 0 is the baseline: the family directory alone (config and start script).

    .venv/bin/python bench/scale.py [--sizes 0 1000 10000 100000] [--repeats 3]

Prints a table and writes bench/results/scale.json (raw samples + environment). The
trees are removed afterwards; 100,000 files take ~400 MB of 4 KiB blocks meanwhile.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# `python bench/scale.py` puts bench/ first on sys.path, so the helper imports as-is.
from _common import (
    ENVOY_BIN,
    REPO,
    BenchError,
    BenchFamily,
    Event,
    Json,
    build_tree,
    cpu_seconds,
    environment,
    format_table,
    inotify_watches,
    parse_ts,
    pick_base_id,
    shm_path,
    status_kb,
    stop_on_sigterm,
    thread_count,
    write_results,
)

BASE_IDS: Final = (50000, 50999)
SIZES: Final = (0, 1_000, 10_000, 100_000)
START_TIMEOUT_S: Final = 180.0
CHECK_TIMEOUT_S: Final = 300.0
SETTLE_S: Final = 1.0  # after the digest, before reading RSS: start-up garbage freed
CHANGES: Final = 5  # one-file changes per start, each timed rename to served


@dataclass(frozen=True, slots=True)
class Start:
    """One daemon start on a tree; times in seconds from just before the spawn."""

    to_daemon_started: float
    to_validated: float  # validation.passed (binary checks + validate, before watching)
    to_watch_started: float
    to_child_started: float
    to_serving: float
    to_body: float
    to_digested: float  # watch.digested: every file read and hashed (debug event)
    digest_s: Json  # its took_s: the worker thread's hashing time
    envoy_startup_s: float | None  # child.serving startup_s
    rss_kb: int
    hwm_kb: int
    cpu_s: float  # the daemon's utime + stime at the end of start-up
    threads: int
    watches_logged: Json  # watch.started `watches`
    watches_fdinfo: int  # inotify wd: lines in the daemon's fdinfo
    directories_logged: Json
    files_logged: Json
    change_ms: list[float]  # one file renamed over (the config): rename to new body served


@dataclass(frozen=True, slots=True)
class Check:
    seconds: float
    exit_code: int
    watch_line: str
    output: str


@dataclass(frozen=True, slots=True)
class Size:
    files: int
    directories_created: int  # in the tree (its root included)
    build_s: float
    check: Check
    starts: list[Start]


def event_ts(family: BenchFamily, name: str, epoch: int | None = None) -> tuple[float, Event]:
    if epoch is None:
        event = family.wait_event(name, timeout_s=START_TIMEOUT_S)
    else:
        event = family.wait_event(name, timeout_s=START_TIMEOUT_S, epoch=epoch)
    return parse_ts(event), event


def one_start(family: BenchFamily, body: str) -> Start:
    family.write_config(body)  # the previous start's changes left another body
    shm_path(family.base_id).unlink(missing_ok=True)
    spawned_wall = time.time()
    spawned = time.monotonic()
    family.start("--log-level", "debug", "--debounce", "0.05")
    process = family.process
    assert process is not None
    # Poll the listener first (every ~2 ms, refused until Envoy binds): when clients
    # are served does not depend on when the daemon gets round to logging LIVE.
    body_at = family.wait_body(body, timeout_s=START_TIMEOUT_S)
    started_ts, _ = event_ts(family, "daemon.started")
    validated_ts, _ = event_ts(family, "validation.passed", epoch=0)
    watch_ts, watch = event_ts(family, "watch.started")
    child_ts, _ = event_ts(family, "child.started", epoch=0)
    serving_ts, serving = event_ts(family, "child.serving", epoch=0)
    digested_ts, digested = event_ts(family, "watch.digested")
    time.sleep(SETTLE_S)
    pid = process.pid
    if process.poll() is not None:
        raise BenchError(f"daemon exited ({process.returncode})")
    startup = serving.get("startup_s")
    rss_kb, hwm_kb = status_kb(pid, "VmRSS"), status_kb(pid, "VmHWM")
    cpu_s, threads, watches = cpu_seconds(pid), thread_count(pid), inotify_watches(pid)
    sample = Start(
        to_daemon_started=started_ts - spawned_wall,
        to_validated=validated_ts - spawned_wall,
        to_watch_started=watch_ts - spawned_wall,
        to_child_started=child_ts - spawned_wall,
        to_serving=serving_ts - spawned_wall,
        to_body=body_at - spawned,
        to_digested=digested_ts - spawned_wall,
        digest_s=digested.get("took_s"),
        envoy_startup_s=float(startup) if isinstance(startup, int | float) else None,
        rss_kb=rss_kb,
        hwm_kb=hwm_kb,
        cpu_s=cpu_s,
        threads=threads,
        watches_logged=watch.get("watches"),
        watches_fdinfo=watches,
        directories_logged=watch.get("directories"),
        files_logged=watch.get("files"),
        change_ms=one_file_changes(family, body),
    )
    status = family.stop()
    if status not in (0, None):
        raise BenchError(
            f"daemon exited {status} on SIGTERM\n{family.log.tail() if family.log else ''}"
        )
    return sample


def one_file_changes(family: BenchFamily, body: str) -> list[float]:
    """Rename a new config over the old one; time to its body served, minus the 50 ms
    debounce the daemon was told to wait. Each waits for the previous parent's exit,
    so the figure is the reaction, not a drain wait."""
    log = family.log
    assert log is not None
    samples = []
    for index in range(1, CHANGES + 1):
        new_body = f"{body}-change-{index}"
        mark = log.mark()
        renamed = time.monotonic()
        family.write_config(new_body)
        served = family.wait_body(new_body, timeout_s=START_TIMEOUT_S)
        samples.append((served - renamed - 0.05) * 1000)
        family.wait_event("child.exited", mark=mark, timeout_s=START_TIMEOUT_S, epoch=index - 1)
    return samples


def run_check(family: BenchFamily) -> Check:
    began = time.monotonic()
    done = subprocess.run(
        family.argv("--check"),
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_S,
        check=False,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    seconds = time.monotonic() - began
    output = (done.stdout + done.stderr).strip()
    watch_line = next((line for line in output.splitlines() if "inotify watches" in line), "")
    return Check(seconds, done.returncode, watch_line.strip(), output)


def one_size(files: int, repeats: int, envoy: Path) -> Size:
    family = BenchFamily(pick_base_id(*BASE_IDS), envoy=envoy)
    try:
        began = time.monotonic()
        directories = build_tree(family.root / "tree", files)
        build_s = time.monotonic() - began
        print(f"  {files:>7,} files: tree built in {build_s:.1f} s", flush=True)
        body = f"scale-{files}"
        family.write_config(body)
        check = run_check(family)
        print(f"  {files:>7,} files: --check {check.seconds:.2f} s, exit {check.exit_code}")
        starts: list[Start] = []
        for repeat in range(repeats):
            start = one_start(family, body)
            starts.append(start)
            print(
                f"  {files:>7,} files: start {repeat + 1}/{repeats}: watch.started "
                f"{start.to_watch_started:.2f} s, serving {start.to_serving:.2f} s, "
                f"RSS {start.rss_kb / 1024:.1f} MiB, watches {start.watches_fdinfo}",
                flush=True,
            )
        return Size(files, directories, build_s, check, starts)
    finally:
        family.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(SIZES), help="files in the tree"
    )
    parser.add_argument("--repeats", type=int, default=3, help="daemon starts per size")
    parser.add_argument("--envoy", type=Path, default=ENVOY_BIN, help="the Envoy binary")
    args = parser.parse_args()
    stop_on_sigterm()
    if args.repeats < 1 or any(size < 0 or size > 200_000 for size in args.sizes):
        parser.error("--repeats must be >= 1 and each size within 0..200000")

    env = environment(args.envoy)
    sizes = [one_size(files, args.repeats, args.envoy) for files in args.sizes]

    def med(values: list[float]) -> float:
        return statistics.median(values)

    rows = []
    for size in sizes:
        s = size.starts
        rows.append(
            [
                f"{size.files:,}",
                str(s[0].directories_logged),
                str(s[0].watches_logged),
                str(s[0].watches_fdinfo),
                f"{med([x.to_daemon_started for x in s]):.2f}",
                f"{med([x.to_watch_started for x in s]):.2f}",
                f"{med([x.to_serving for x in s]):.2f}",
                f"{med([x.to_body for x in s]):.2f}",
                f"{med([x.to_validated - x.to_daemon_started for x in s]):.2f}",
                f"{med([x.to_watch_started - x.to_validated for x in s]):.2f}",
                f"{med([x.to_digested for x in s]):.2f}",
                f"{med([c for x in s for c in x.change_ms]):.1f}",
                f"{med([x.rss_kb / 1024 for x in s]):.1f}",
                f"{med([x.hwm_kb / 1024 for x in s]):.1f}",
                f"{med([x.cpu_s for x in s]):.2f}",
                f"{size.check.seconds:.2f}",
                str(size.check.exit_code),
            ]
        )
    print()
    print(
        f"Scale of watching: median of {args.repeats} daemon start(s) per size; "
        "times in s from the spawn, memory in MiB"
    )
    print(
        format_table(
            [
                "files",
                "dirs",
                "watches (log)",
                "watches (fdinfo)",
                "daemon.started",
                "watch.started",
                "LIVE logged",
                "served",
                "gate",
                "watch set-up",
                "digested",
                "change ms",
                "RSS",
                "RSS peak",
                "CPU s",
                "--check",
                "check exit",
            ],
            rows,
        )
    )
    path = write_results(
        "scale",
        {
            "bench": "scale",
            "repeats": args.repeats,
            "environment": env,
            "sizes": [dataclasses.asdict(s) for s in sizes],
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
