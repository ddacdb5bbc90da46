"""Storm coalescing: a burst of N files (one config edit among them) is one restart.

For each burst size (10, 500, 10,000 by default) new files are written into a watched
data directory as fast as Python can write them, with one atomic config edit (a new
listener body) in the middle of the burst. Then we poll the listener (new connection
every ~2 ms) until it serves the new body, wait for the old parent to exit, give the
watcher a further quiet period to show any second restart, and count from the daemon's
JSON log:

- events seen:   `restart.requested` events (raw watcher events in the burst)
- files changed: `restart.requested` count (N + 1 expected: the files and envoy.yaml)
- restarts:      `child.started` during the burst (must be 1; reported, not asserted)
- last write to served, split at `restart.requested` and `child.serving`

One daemon serves all bursts, as in production; the data directory keeps growing
(10 + 500 + 10,000 files), so later bursts also pay for digesting the earlier files.

    .venv/bin/python bench/storm.py [--sizes 10 500 10000]

Prints a table and writes bench/results/storm.json (raw figures + environment).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# `python bench/storm.py` puts bench/ first on sys.path, so the helper imports as-is.
from _common import (
    ENVOY_BIN,
    BenchError,
    BenchFamily,
    Json,
    daemon_has_option,
    environment,
    format_table,
    number,
    parse_ts,
    pick_base_id,
    stop_on_sigterm,
    write_results,
)

BASE_IDS: Final = (50500, 50999)
SIZES: Final = (10, 500, 10_000)
START_TIMEOUT_S: Final = 60.0
BURST_TIMEOUT_S: Final = 90.0
# After the old parent exited, how long we keep looking for a second restart. Far above
# the 0.3 s debounce: a trailing request would have been made by then, and a restart
# requested while the parent drained starts as soon as it exits.
QUIET_S: Final = 2.0


@dataclass(frozen=True, slots=True)
class Burst:
    files: int
    write_s: float  # first to last write
    events: Json  # restart.requested events: raw watcher events in the burst
    files_changed: Json  # restart.requested count
    restarts: int  # child.started during the burst
    requests: int  # restart.requested during the burst
    overflows: int  # watch.overflow during the burst (kernel queue full: full rescan)
    validation_s: float | None
    last_write_to_requested: float
    requested_to_serving: float
    last_write_to_served: float
    epochs: list[int]


def write_burst(
    family: BenchFamily, data: Path, size: int, body: str
) -> tuple[float, float, float]:
    """Write `size` new files, the config edit half way; (first, last) monotonic, last wall."""
    payloads = [
        (data / f"burst{size}-{i:05d}.json", f'{{"burst": {size}, "n": {i}}}\n')
        for i in range(size)
    ]
    first_at = time.monotonic()
    for i, (path, text) in enumerate(payloads):
        if i == size // 2:
            family.write_config(body)
        path.write_text(text)
    last_at = time.monotonic()
    last_wall = time.time()
    return first_at, last_at, last_wall


def one_burst(family: BenchFamily, data: Path, size: int, serving_epoch: int) -> Burst:
    log = family.log
    assert log is not None
    body = f"storm-{size}"
    mark = log.mark()
    first_at, last_at, last_wall = write_burst(family, data, size, body)
    served_at = family.wait_body(body, timeout_s=BURST_TIMEOUT_S)
    requested = family.wait_event("restart.requested", mark=mark, timeout_s=BURST_TIMEOUT_S)
    serving = family.wait_event("child.serving", mark=mark, timeout_s=BURST_TIMEOUT_S)
    family.wait_event("child.exited", mark=mark, timeout_s=BURST_TIMEOUT_S, epoch=serving_epoch)
    time.sleep(QUIET_S)  # a bounded look for a second restart; see QUIET_S
    # If there was a second restart after all, let it finish before the next burst.
    started = log.since(mark, "child.started")
    newest = started[-1].get("epoch")
    if isinstance(newest, int) and len(started) > 1:
        family.wait_event("child.serving", mark=mark, timeout_s=BURST_TIMEOUT_S, epoch=newest)
        previous = log.since(mark, "child.serving")[-2].get("epoch")
        family.wait_event("child.exited", mark=mark, timeout_s=BURST_TIMEOUT_S, epoch=previous)
    validated = log.since(mark, "validation.passed")
    return Burst(
        files=size,
        write_s=last_at - first_at,
        events=requested.get("events"),
        files_changed=requested.get("count"),
        restarts=len(started),
        requests=len(log.since(mark, "restart.requested")),
        overflows=len(log.since(mark, "watch.overflow")),
        validation_s=number(validated[0], "duration_s") if validated else None,
        last_write_to_requested=parse_ts(requested) - last_wall,
        requested_to_serving=parse_ts(serving) - parse_ts(requested),
        last_write_to_served=served_at - last_at,
        epochs=[e for e in (s.get("epoch") for s in started) if isinstance(e, int)],
    )


def run(sizes: list[int], envoy: Path) -> tuple[int, list[Burst]]:
    family = BenchFamily(pick_base_id(*BASE_IDS), envoy=envoy)
    try:
        data = family.root / "data"
        data.mkdir()
        family.write_config("storm-v0")
        family.start()
        family.wait_event("child.serving", timeout_s=START_TIMEOUT_S, epoch=0)
        family.wait_body("storm-v0")
        serving_epoch = 0
        bursts: list[Burst] = []
        for size in sizes:
            burst = one_burst(family, data, size, serving_epoch)
            if not burst.epochs:
                raise BenchError(f"burst of {size}: no child.started")
            serving_epoch = burst.epochs[-1]
            bursts.append(burst)
            print(
                f"  burst {size:>6}: restarts {burst.restarts}, "
                f"last write to served {burst.last_write_to_served * 1000:.0f} ms",
                flush=True,
            )
        return family.base_id, bursts
    finally:
        family.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="files per burst")
    parser.add_argument("--envoy", type=Path, default=ENVOY_BIN, help="the Envoy binary")
    args = parser.parse_args()
    stop_on_sigterm()
    if any(size < 2 for size in args.sizes):
        parser.error("each burst needs at least 2 files")

    env = environment(args.envoy)
    env["daemon_has_no_validate_option"] = daemon_has_option("--no-validate")
    base_id, bursts = run(args.sizes, args.envoy)

    def ms(value: float | None) -> str:
        return "off" if value is None else f"{value * 1000:.0f}"

    rows = [
        [
            f"{b.files:,}",
            f"{b.write_s * 1000:.0f}",
            str(b.events),
            str(b.files_changed),
            str(b.restarts),
            str(b.overflows),
            ms(b.last_write_to_requested),
            ms(b.validation_s),
            ms(b.requested_to_serving),
            ms(b.last_write_to_served),
        ]
        for b in bursts
    ]
    print()
    print("Storm coalescing (default debounce 0.3 s, debounce-max 5 s); times in ms")
    print(
        format_table(
            [
                "files",
                "write",
                "events seen",
                "files changed",
                "restarts",
                "overflows",
                "last write→requested",
                "validation",
                "requested→LIVE",
                "last write→served",
            ],
            rows,
        )
    )
    odd = [b.files for b in bursts if b.restarts != 1]
    if odd:
        print(f"\nNOTE: bursts of {odd} made other than exactly one restart")
    path = write_results(
        "storm",
        {
            "bench": "storm",
            "base_id": base_id,
            "environment": env,
            "bursts": [dataclasses.asdict(b) for b in bursts],
        },
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
