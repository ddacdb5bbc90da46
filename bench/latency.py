"""Reaction latency: from a config rename to the new config served on the listener.

For each change: write `envoy.yaml.tmp`, `os.replace` it over `envoy.yaml` (an editor's
atomic save), then poll 127.0.0.1:<listener> every ~2 ms with a NEW connection each
time until the body is the new version. That total is split with the daemon's own
events:

- debounce:    `restart.requested` ts minus the rename (quiet window + read + digest)
- validation:  `validation.passed` duration_s (0 when the daemon does not validate)
- envoy start: `child.serving` startup_s (spawn to Envoy reporting LIVE)
- overhead:    what is left (spawning after the request, seeing LIVE, the listener
               handing over, our poll interval)

Changes are spaced so each restart finds the previous parent gone (we wait for its
`child.exited`, ~2 s with `--parent-shutdown-time-s 2`): the figure is the reaction
time, not the drain wait. Run twice: default debounce (0.3 s) and `--debounce 0.05`.

    .venv/bin/python bench/latency.py [--changes 20]

Prints a table and writes bench/results/latency.json (raw samples + environment).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# `python bench/latency.py` puts bench/ first on sys.path, so the helper imports as-is.
from _common import (
    ENVOY_BIN,
    BenchError,
    BenchFamily,
    Event,
    Json,
    daemon_has_option,
    environment,
    format_table,
    number,
    parse_ts,
    pick_base_id,
    stop_on_sigterm,
    summary,
    write_results,
)

BASE_IDS: Final = (50000, 50499)
PHASES: Final = ("total", "debounce", "validation", "envoy_start", "overhead")
# A finer look at the overhead, from the log's timestamps (ms resolution).
DETAIL: Final = ("requested_to_started", "started_to_served", "serving_logged_to_served")
START_TIMEOUT_S: Final = 60.0
STEP_TIMEOUT_S: Final = 30.0


@dataclass(frozen=True, slots=True)
class Sample:
    """One change, in seconds; the five phases, then a finer split of the overhead."""

    change: int
    epoch: int
    total: float
    debounce: float
    validation: float
    envoy_start: float
    overhead: float
    requested_to_started: float  # validation plus spawning, from the log's ms stamps
    started_to_served: float  # spawn logged until our poll saw the new body
    serving_logged_to_served: float  # LIVE logged until the new body (< 0: served first)
    validated: bool
    restarts: int  # child.started during this change: 1 expected
    requests: int  # restart.requested during this change: 1 expected
    events: Json
    files_changed: Json

    def phase(self, name: str) -> float:
        value = getattr(self, name)
        assert isinstance(value, float)
        return value


def one_change(family: BenchFamily, index: int, tag: str, serving_epoch: int) -> Sample:
    """Rename a new config in, wait until it is served and the old parent has exited."""
    log = family.log
    assert log is not None
    body = f"{tag}-v{index}"
    tmp = family.root / "envoy.yaml.tmp"
    tmp.write_text(family.config_text(body))
    mark = log.mark()
    renamed_wall = time.time()
    renamed_at = time.monotonic()
    os.replace(tmp, family.config)
    served_at = family.wait_body(body, timeout_s=STEP_TIMEOUT_S)
    total_s = served_at - renamed_at

    requested = family.wait_event("restart.requested", mark=mark, timeout_s=STEP_TIMEOUT_S)
    serving = family.wait_event("child.serving", mark=mark, timeout_s=STEP_TIMEOUT_S)
    epoch = serving.get("epoch")
    if not isinstance(epoch, int):
        raise BenchError(f"child.serving without an epoch: {serving}")
    # Validation (if on) ran before the spawn, so it is already in the log by now.
    validated: Event | None = next(iter(log.since(mark, "validation.passed")), None)
    if log.since(mark, "validation.failed"):
        raise BenchError(f"change {index}: validation failed\n{log.tail()}")
    started = family.wait_event("child.started", mark=mark, timeout_s=STEP_TIMEOUT_S)
    # Space the next change: the old parent must be gone before the next restart.
    family.wait_event("child.exited", mark=mark, timeout_s=STEP_TIMEOUT_S, epoch=serving_epoch)

    debounce_s = parse_ts(requested) - renamed_wall
    validation_s = number(validated, "duration_s") or 0.0
    envoy_start_s = number(serving, "startup_s")
    if envoy_start_s is None:
        raise BenchError(f"child.serving without startup_s: {serving}")
    served_wall = renamed_wall + total_s
    return Sample(
        change=index,
        epoch=epoch,
        total=total_s,
        debounce=debounce_s,
        validation=validation_s,
        envoy_start=envoy_start_s,
        overhead=total_s - debounce_s - validation_s - envoy_start_s,
        requested_to_started=parse_ts(started) - parse_ts(requested),
        started_to_served=served_wall - parse_ts(started),
        serving_logged_to_served=served_wall - parse_ts(serving),
        validated=validated is not None,
        restarts=len(log.since(mark, "child.started")),
        requests=len(log.since(mark, "restart.requested")),
        events=requested.get("events"),
        files_changed=requested.get("count"),
    )


@dataclass(frozen=True, slots=True)
class Run:
    debounce_option: str
    base_id: int
    first_startup_s: float | None
    samples: list[Sample]

    @property
    def validation(self) -> str:
        return "on" if any(s.validated for s in self.samples) else "off"

    def stats(self) -> dict[str, dict[str, float]]:
        return {p: summary([s.phase(p) for s in self.samples]) for p in (*PHASES, *DETAIL)}

    def to_json(self) -> dict[str, Json]:
        return {
            "debounce_option": self.debounce_option,
            "base_id": self.base_id,
            "first_startup_s": self.first_startup_s,
            "validation": self.validation,
            "stats": {p: dict(v) for p, v in self.stats().items()},
            "samples": [dataclasses.asdict(s) for s in self.samples],
        }


def run(changes: int, debounce: float | None, envoy: Path) -> Run:
    """One daemon, `changes` renames, raw samples back. Always cleans up."""
    tag = "default" if debounce is None else f"d{debounce:g}"
    family = BenchFamily(pick_base_id(*BASE_IDS), envoy=envoy)
    try:
        family.write_config(f"{tag}-v0")
        family.start(*([] if debounce is None else ["--debounce", str(debounce)]))
        serving = family.wait_event("child.serving", timeout_s=START_TIMEOUT_S, epoch=0)
        family.wait_body(f"{tag}-v0")
        serving_epoch = 0
        samples: list[Sample] = []
        for index in range(1, changes + 1):
            sample = one_change(family, index, tag, serving_epoch)
            serving_epoch = sample.epoch
            samples.append(sample)
            print(
                f"  [{tag}] change {index:>3}/{changes}: total {sample.total * 1000:7.1f} ms"
                f" (restarts {sample.restarts})",
                flush=True,
            )
        return Run(
            debounce_option="default" if debounce is None else str(debounce),
            base_id=family.base_id,
            first_startup_s=number(serving, "startup_s"),
            samples=samples,
        )
    finally:
        family.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--changes", type=int, default=20, help="renames per run (default 20)")
    parser.add_argument("--envoy", type=Path, default=ENVOY_BIN, help="the Envoy binary")
    args = parser.parse_args()
    stop_on_sigterm()
    if args.changes < 1:
        parser.error("--changes must be at least 1")

    env = environment(args.envoy)
    env["daemon_has_no_validate_option"] = daemon_has_option("--no-validate")
    runs = [run(args.changes, debounce, args.envoy) for debounce in (None, 0.05)]

    rows: list[list[str]] = []
    detail_rows: list[list[str]] = []
    for result in runs:
        label = f"--debounce {result.debounce_option}"
        for phase, st in result.stats().items():
            note = " (off)" if phase == "validation" and result.validation == "off" else ""
            first = phase in ("total", DETAIL[0])
            (rows if phase in PHASES else detail_rows).append(
                [
                    label if first else "",
                    phase + note,
                    *(f"{st[k] * 1000:.1f}" for k in ("median", "p95", "min", "max")),
                ]
            )
    header = ["run", "phase", "median", "p95", "min", "max"]
    print()
    print(f"Reaction latency, rename to new body served ({args.changes} changes per run), ms")
    print(format_table(header, rows))
    print()
    print("Where the overhead goes (daemon log timestamps vs. first new body), ms")
    print(format_table(header, detail_rows))
    extra = [s for r in runs for s in r.samples if s.restarts != 1 or s.requests != 1]
    if extra:
        print(f"\nNOTE: {len(extra)} change(s) did not make exactly one request and one restart")
    path = write_results(
        "latency",
        {
            "bench": "latency",
            "changes": args.changes,
            "environment": env,
            "runs": [r.to_json() for r in runs],
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
