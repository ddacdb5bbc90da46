"""A restart, interleaved: rename to served, this checkout against another commit's,
two families alive at once and their changes taken by turns.

`latency.py` compares the daemon with upstream's restarter; this compares two versions
of the daemon, for a change whose effect (a millisecond or two of ~50) is smaller than
the drift between two runs an hour apart. Each round renames a new config into each
family's watched directory, the order alternating, and waits for its body on a new
connection (polled every ~2 ms) and then for the old parent's exit before the next.
The figure is rename to served minus the `--debounce` each daemon was told to wait.

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/restart_ab.py --before /tmp/before [--rounds 40]
        [--envoy PATH] [--debounce 0.05] [-- DAEMON OPTIONS, e.g. --no-validate]

Prints the medians and the ratio this/before with its 95% interval (`paired_ratio`);
writes bench/results/restart_ab.json (every sample, both commits, the environment).

The interval covers the spread from round to round, not a difference between the two
families themselves (ports, base id, where their Envoys run): A/A runs, `--before`
this same checkout, gave 0.997 (0.977-1.013) and 1.032 (0.994-1.055) here
(`--results restart_aa`), and 0.977 (0.967-0.999) with an earlier script. A difference
of 3% or less is not shown by one run.
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

# `python bench/restart_ab.py` puts bench/ first on sys.path, so the helpers import as-is.
from _common import (
    ENVOY_BIN,
    REPO,
    BenchError,
    BenchFamily,
    Json,
    environment,
    paired_ratio,
    pick_base_id,
    shm_path,
    stop_on_sigterm,
    write_results,
)
from startup_ab import commit_of

BASE_IDS: Final = (55000, 55499)
STEP_TIMEOUT_S: Final = 30.0


@dataclass
class Side:
    """One checkout's daemon on a family of its own, and what it measured."""

    name: str
    tree: Path
    family: BenchFamily
    epoch: int = 0
    reactions: list[float] = field(default_factory=list)

    def start(self, options: list[str]) -> None:
        family = self.family
        family.write_config(f"{self.name}-v0")
        family.start(*options, tree=self.tree)
        family.wait_event("child.serving", timeout_s=60, epoch=0)
        family.wait_body(f"{self.name}-v0", timeout_s=60)

    def change(self, index: int, debounce_s: float) -> None:
        """One rename; the old parent gone before it returns (the next restart must
        not wait for a drain)."""
        family, log = self.family, self.family.log
        assert log is not None
        body = f"{self.name}-v{index}"
        tmp = family.root / "envoy.yaml.tmp"
        tmp.write_text(family.config_text(body))
        mark = log.mark()
        renamed = time.monotonic()
        os.replace(tmp, family.config)
        served = family.wait_body(body, timeout_s=STEP_TIMEOUT_S)
        serving = family.wait_event("child.serving", mark=mark, timeout_s=STEP_TIMEOUT_S)
        family.wait_event("child.exited", mark=mark, timeout_s=STEP_TIMEOUT_S, epoch=self.epoch)
        epoch = serving.get("epoch")
        if not isinstance(epoch, int):
            raise BenchError(f"child.serving without an epoch: {serving}")
        self.epoch = epoch
        self.reactions.append(served - renamed - debounce_s)


def pick_two() -> list[int]:
    """Two distinct free base ids: `pick_base_id` alone would give the same one twice
    until the first family's Envoy made its shared memory."""
    first = pick_base_id(*BASE_IDS)
    for candidate in range(BASE_IDS[0], BASE_IDS[1] + 1):
        if candidate != first and not shm_path(candidate).exists():
            return [first, candidate]
    raise BenchError(f"fewer than two free Envoy base ids in {BASE_IDS}")


def run(
    before: Path, rounds: int, envoy: Path, options: list[str], debounce_s: float
) -> list[Side]:
    sides: list[Side] = []
    try:
        for base_id, (name, tree) in zip(
            pick_two(), (("before", before), ("this", REPO)), strict=True
        ):
            family = BenchFamily(base_id, envoy=envoy)
            sides.append(Side(name, tree, family))
            family_options = [
                "--debounce",
                str(debounce_s),
                "--state-dir",
                str(family.tmp / "state"),
            ]
            family_options += ["--control-socket", str(family.tmp / "control.sock"), *options]
            sides[-1].start(family_options)
        for index in range(1, rounds + 1):
            for side in sides if index % 2 else reversed(sides):
                side.change(index, debounce_s)
            figures = ", ".join(f"{s.name} {s.reactions[-1] * 1000:6.1f}" for s in sides)
            print(f"  round {index:>3}/{rounds}: {figures} ms", flush=True)
        return sides
    finally:
        for side in sides:
            side.family.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="another commit's checkout")
    parser.add_argument("--rounds", type=int, default=40, help="changes of each, by turns")
    parser.add_argument("--envoy", type=Path, default=ENVOY_BIN, help="the Envoy binary")
    parser.add_argument("--debounce", type=float, default=0.05, help="both daemons' --debounce")
    parser.add_argument(
        "--results", default="restart_ab", help="bench/results/NAME.json (default restart_ab)"
    )
    parser.add_argument("options", nargs="*", help="more daemon options, after --")
    args = parser.parse_args()
    stop_on_sigterm()
    before = args.before.resolve()
    if args.rounds < 2 or not (before / "envoy_autoreload").is_dir():
        parser.error("--rounds must be at least 2 and --before a checkout of envoy_autoreload")
    env = environment(args.envoy)  # compiles this checkout's bytecode
    compileall.compile_dir(before / "envoy_autoreload", quiet=1)
    sides = run(before, args.rounds, args.envoy, args.options, args.debounce)
    old, new = sides
    verdict = paired_ratio(new.reactions, old.reactions)
    for side in sides:
        print(f"{side.name:>6}: median {statistics.median(side.reactions) * 1000:.2f} ms")
    print(
        f"this/before {verdict['ratio_of_medians']:.3f} (95% interval {verdict['ci95_low']:.3f}"
        f"-{verdict['ci95_high']:.3f}; median of round ratios "
        f"{verdict['median_of_round_ratios']:.3f})"
    )
    payload: dict[str, Json] = {
        "bench": "restart_ab",
        "rounds": args.rounds,
        "debounce_s": args.debounce,
        "daemon_options": [*args.options],
        "commits": {s.name: commit_of(s.tree) for s in sides},
        "reactions_s": {s.name: [round(r, 5) for r in s.reactions] for s in sides},
        "this_over_before": dict(verdict),
        "environment": env,
    }
    print(f"wrote {write_results(args.results, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
