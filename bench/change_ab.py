"""One file changed, interleaved: a small watched tree against a big one, change by
change, each with its own daemon and Envoy running side by side (issue 16, goal 3).

`scale.py` measures each tree size after the other, minutes apart; this machine's
speed drifts by more than the 20 ms the goal allows between a 10-file and a
100,000-file tree. Here both families run at once, and their changes alternate (the
order swapped every turn): the drift falls on both alike, and only one restart runs at
a time, so each has the machine as `scale.py`'s had it.

    .venv/bin/python bench/change_ab.py [--files 100000] [--changes 15]

Each change renames a new config over the old one and times it until the listener
serves its body, minus the 50 ms `--debounce` both daemons run with (as in
`scale.py`), then waits for the previous epoch to exit. Both daemons start with
`--log-level debug` and the first change waits for `watch.digested` (every file read).

The daemon's own CPU time (utime + stime of its process, every thread; not its
children's) is read before the first change and after the last: per change it says
whether the daemon does more work for a bigger tree, which served times on a machine
this noisy cannot settle to a few milliseconds.

Prints the medians and writes bench/results/change_ab.json (every sample).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Final

# `python bench/change_ab.py` puts bench/ first on sys.path, so the helper imports as-is.
from _common import (
    ENVOY_BIN,
    BenchFamily,
    Json,
    build_tree,
    cpu_seconds,
    environment,
    pick_base_id,
    stop_on_sigterm,
    write_results,
)

DEBOUNCE_S: Final = 0.05
TIMEOUT_S: Final = 60.0
SMALL_FILES: Final = 10


def change_once(family: BenchFamily, epoch: int) -> float:
    """Epoch `epoch` from a rename: ms to its body served, minus the debounce."""
    log = family.log
    assert log is not None
    body = f"change-{epoch}"
    mark = log.mark()
    renamed = time.monotonic()
    family.write_config(body)
    served = family.wait_body(body, timeout_s=TIMEOUT_S)
    family.wait_event("child.exited", mark=mark, timeout_s=TIMEOUT_S, epoch=epoch - 1)
    return (served - renamed - DEBOUNCE_S) * 1000


def daemon_pid(family: BenchFamily) -> int:
    assert family.process is not None
    return family.process.pid


def started(family: BenchFamily, files: int) -> BenchFamily:
    family.write_config("change-0")
    if files:
        build_tree(family.root / "tree", files)
    family.start("--log-level", "debug", "--debounce", str(DEBOUNCE_S))
    family.wait_body("change-0", timeout_s=TIMEOUT_S)
    family.wait_event("watch.digested", timeout_s=TIMEOUT_S)
    return family


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000, help="files in the big tree")
    parser.add_argument("--changes", type=int, default=15, help="changes of each, by turns")
    parser.add_argument("--envoy", type=Path, default=ENVOY_BIN)
    args = parser.parse_args()
    if args.changes < 1 or not 0 < args.files <= 200_000:
        parser.error("--changes must be >= 1 and --files within 1..200000")
    stop_on_sigterm()
    env = environment(args.envoy)
    sizes = {SMALL_FILES: BenchFamily(pick_base_id(55000, 55249), envoy=args.envoy)}
    sizes[args.files] = BenchFamily(pick_base_id(55250, 55499), envoy=args.envoy)
    try:
        for files, family in sizes.items():
            started(family, files)
        samples: dict[int, list[float]] = {files: [] for files in sizes}
        cpu = {files: cpu_seconds(daemon_pid(family)) for files, family in sizes.items()}
        for epoch in range(1, args.changes + 1):
            order = list(sizes.items()) if epoch % 2 else list(reversed(sizes.items()))
            for files, family in order:
                samples[files].append(change_once(family, epoch))
        cpu_ms = {
            files: (cpu_seconds(daemon_pid(family)) - cpu[files]) * 1000 / args.changes
            for files, family in sizes.items()
        }
    finally:
        for family in sizes.values():
            family.close()
    medians = {files: statistics.median(values) for files, values in samples.items()}
    for files, median in medians.items():
        print(
            f"{files:>7,} files: one change served in {median:.1f} ms (median of "
            f"{args.changes}); the daemon's CPU {cpu_ms[files]:.1f} ms per change"
        )
    print(f"difference of medians: {medians[args.files] - medians[SMALL_FILES]:+.1f} ms")
    result: dict[str, Json] = {
        "bench": "change_ab",
        "changes": args.changes,
        "environment": env,
        "sizes": [
            {
                "files": n,
                "change_ms": [round(v, 2) for v in values],
                "median_ms": medians[n],
                "daemon_cpu_ms_per_change": round(cpu_ms[n], 2),
            }
            for n, values in samples.items()
        ],
    }
    print(f"wrote {write_results('change_ab', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
