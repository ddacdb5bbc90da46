"""Reaction latency: from a config rename to the new config served on the listener.

For each change: write `envoy.yaml.tmp`, `os.replace` it over `envoy.yaml` (an editor's
atomic save), then poll 127.0.0.1:<listener> every ~2 ms with a NEW connection each
time until the body is the new version. That total is split with the daemon's own
events:

- debounce:    `restart.requested` ts minus the rename (quiet window + read + digest)
- validation:  `validation.passed` duration_s (0 when the daemon does not validate): the
               check's own time. It runs during the debounce where it can
               (`check_ahead.py`), so it is not a share of the total; what it still
               holds the start back is in `requested_to_started`
- envoy start: `child.serving` startup_s (spawn to Envoy reporting LIVE)
- overhead:    what is left once the debounce, `requested_to_started` (the wait for the
               verdict and the spawn) and Envoy's start are taken off (seeing LIVE,
               the listener handing over, our poll interval; < 0 when the listener
               serves before the daemon's probe sees LIVE)

Changes are spaced so each restart finds the previous parent gone (we wait for its
`child.exited`, ~2 s with `--parent-shutdown-time-s 2`): the figure is the reaction
time, not the drain wait. First run: the default debounce (0.3 s).

Side by side (on by default): upstream's `bench/upstream/hot-restarter.py` against the
daemon, the same Envoy binary, config style and start script, three families alive at
once and their changes alternating (the order rotates each round), `--changes` each:

- daemon as shipped: its defaults (a 0.3 s debounce, validation on); rename to served
  minus the 0.3 s it waits. The validation runs within the debounce (check_ahead.py);
- daemon validating, `--debounce 0.05`: rename to served minus 0.05 s; where the
  validation takes longer than 0.05 s (60-100 ms here) the rest of it is on the path.
  Called "as shipped" before the seventh round of issue 16;
- daemon `--no-validate` (`--debounce 0.05`): the same work as upstream, which
  validates nothing;
- upstream: the new config renamed in, then SIGHUP to the restarter; SIGHUP to served.

Each daemon's ratio of medians to upstream's is printed with a 95% bootstrap interval
(the rounds resampled as pairs) and the median of the rounds' own ratios: the daemon's
lead to the script's exec (1-2 ms, `exec_split.py`) is smaller than the spread of
Envoy's own start, so whether a run's ratio is above or below 1.0 needs that interval.
It does not cover what differs between two families as such: two identical daemons
side by side (`restart_ab.py --before` this checkout) came out up to 3% apart.

Every daemon here gets its own `--state-dir` and `--control-socket` in its temp
directory (generations on, as shipped, without sharing /var/lib or /run between them).

With `--sessions N` the side-by-side run is done N times, each on fresh families (new
daemons, Envoys, base ids and ports; the base ids handed out shifted by one each time),
and the interval resamples the sessions as well as their rounds (`sessions_ratio`):
what one family's luck adds is then in it.

    .venv/bin/python bench/latency.py [--changes 20] [--runs all|default|side-by-side]
        [--sessions 1] [--subjects shipped validating novalidate upstream]

Prints tables and writes bench/results/latency.json (raw samples + environment).
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

# `python bench/latency.py` puts bench/ first on sys.path, so the helper imports as-is.
from _common import (
    ENVOY_BIN,
    REPO,
    BenchError,
    BenchFamily,
    Event,
    Json,
    daemon_has_option,
    environment,
    format_table,
    number,
    parse_ts,
    sessions_ratio,
    shm_path,
    stop_on_sigterm,
    summary,
    wait_for,
    write_results,
)

BASE_IDS: Final = (50000, 50499)
PHASES: Final = ("total", "debounce", "validation", "envoy_start", "overhead")
# A finer look at the overhead, from the log's timestamps (ms resolution).
DETAIL: Final = ("requested_to_started", "started_to_served", "serving_logged_to_served")
START_TIMEOUT_S: Final = 60.0
STEP_TIMEOUT_S: Final = 30.0
UPSTREAM: Final = REPO / "bench" / "upstream" / "hot-restarter.py"
SIDE_DEBOUNCE_S: Final = 0.05  # what the side-by-side daemons are told to wait
DEFAULT_DEBOUNCE_S: Final = 0.3  # the daemon's own default (settings.py)


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
    requested_to_started: float  # the verdict's wait plus spawning, from the log's ms stamps
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
    # With --no-validate the gate still logs `validation.passed` (Envoy's validation
    # did not run; `duration_s` is then the gate's own time, ~0).
    validation_s = number(validated, "duration_s") or 0.0
    envoy_start_s = number(serving, "startup_s")
    if envoy_start_s is None:
        raise BenchError(f"child.serving without startup_s: {serving}")
    served_wall = renamed_wall + total_s
    waited_s = parse_ts(started) - parse_ts(requested)
    return Sample(
        change=index,
        epoch=epoch,
        total=total_s,
        debounce=debounce_s,
        validation=validation_s,
        envoy_start=envoy_start_s,
        overhead=total_s - debounce_s - waited_s - envoy_start_s,
        requested_to_started=waited_s,
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
    label: str
    debounce_option: str
    base_id: int
    first_startup_s: float | None
    samples: list[Sample]
    no_validate: bool = False  # run with --no-validate

    @property
    def validation(self) -> str:
        return "off" if self.no_validate else "on"

    def stats(self) -> dict[str, dict[str, float]]:
        return {p: summary([s.phase(p) for s in self.samples]) for p in (*PHASES, *DETAIL)}

    def to_json(self) -> dict[str, Json]:
        return {
            "label": self.label,
            "debounce_option": self.debounce_option,
            "base_id": self.base_id,
            "first_startup_s": self.first_startup_s,
            "validation": self.validation,
            "stats": {p: dict(v) for p, v in self.stats().items()},
            "samples": [dataclasses.asdict(s) for s in self.samples],
        }


def daemon_options(family: BenchFamily) -> list[str]:
    """As shipped (generations on), but in the family's temp directory: two daemons at
    once must not share the default state directory (one would lock the other out of
    its generations) or control socket, and a bench must not leave /var/lib behind."""
    return [
        "--state-dir",
        str(family.tmp / "state"),
        "--control-socket",
        str(family.tmp / "control.sock"),
    ]


def pick_base_ids(count: int) -> list[int]:
    """`count` distinct base ids from latency's range whose shared memory nobody holds.

    `pick_base_id` looks at /dev/shm only, which a family fills once its Envoy runs,
    so families created one after the other would all get the same id from it.
    """
    first, last = BASE_IDS
    span = last - first + 1
    start = os.getpid() % span
    candidates = (first + (start + step) % span for step in range(span))
    chosen = [b for b in candidates if not shm_path(b).exists()][:count]
    if len(chosen) < count:
        raise BenchError(f"fewer than {count} free Envoy base ids in {first}-{last}")
    return chosen


def run(changes: int, debounce: float | None, envoy: Path) -> Run:
    """One daemon, `changes` renames, raw samples back. Always cleans up."""
    tag = "default" if debounce is None else f"d{debounce:g}"
    family = BenchFamily(pick_base_ids(1)[0], envoy=envoy)
    try:
        family.write_config(f"{tag}-v0")
        options = [] if debounce is None else ["--debounce", str(debounce)]
        family.start(*options, *daemon_options(family))
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
        option = "default" if debounce is None else str(debounce)
        return Run(
            label=f"--debounce {option}",
            debounce_option=option,
            base_id=family.base_id,
            first_startup_s=number(serving, "startup_s"),
            samples=samples,
        )
    finally:
        family.close()


# -- side by side: upstream's hot-restarter.py and the daemon --------------------------
@dataclass
class Contender:
    """One subject of the side-by-side run: its family, its options (None: upstream's
    restarter), what it measured (seconds: daemon rename to served minus the debounce,
    upstream SIGHUP to served)."""

    name: str
    family: BenchFamily
    options: tuple[str, ...] | None
    tag: str
    debounce_s: float = SIDE_DEBOUNCE_S  # what it was told to wait (none: upstream)
    epoch: int = 0
    first_startup_s: float | None = None
    reactions: list[float] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    @property
    def is_upstream(self) -> bool:
        return self.options is None

    def run(self) -> Run:
        """The daemon's samples as a run of the phase tables."""
        return Run(
            label=f"side by side: {self.name}",
            debounce_option=str(self.debounce_s),
            base_id=self.family.base_id,
            first_startup_s=self.first_startup_s,
            samples=self.samples,
            no_validate="--no-validate" in (self.options or ()),
        )

    def to_json(self) -> dict[str, Json]:
        return {
            "name": self.name,
            "base_id": self.family.base_id,
            "command": "hot-restarter.py + SIGHUP" if self.options is None else [*self.options],
            "measures": "SIGHUP to served"
            if self.is_upstream
            else f"rename to served minus {self.debounce_s} s",
            "stats": dict(summary(self.reactions)),
            "reactions_s": [*self.reactions],
        }


def start_upstream(family: BenchFamily) -> None:
    """`hot-restarter.py START_SCRIPT` in its own session: it sets RESTART_EPOCH and
    forks the family's start script, which execs Envoy with it and our base id. Its
    log (and Envoy's, inherited) goes beside the family directory."""
    with open(family.tmp / "upstream.log", "wb") as log:
        family.process = subprocess.Popen(
            [sys.executable, str(UPSTREAM), str(family.script)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=family.tmp,
            start_new_session=True,
        )


def upstream_tail(family: BenchFamily) -> str:
    try:
        text = (family.tmp / "upstream.log").read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-20:])


def start_contender(contender: Contender) -> None:
    family = contender.family
    family.write_config(f"{contender.tag}-v0")
    if contender.options is None:
        start_upstream(family)
    else:
        family.start(*contender.options)
        serving = family.wait_event("child.serving", timeout_s=START_TIMEOUT_S, epoch=0)
        contender.first_startup_s = number(serving, "startup_s")
    family.wait_body(f"{contender.tag}-v0", timeout_s=START_TIMEOUT_S)


def our_envoys(family: BenchFamily) -> set[int]:
    """PIDs of this family's live Envoys (a reaped or zombie one has no command line)."""
    pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    return {pid for pid in pids if family.owns(pid)}


def one_upstream_change(family: BenchFamily, index: int, tag: str) -> float:
    """Rename the new config in, SIGHUP the restarter, seconds until it is served; then
    wait for the old Envoy to exit, as the daemon's changes wait for `child.exited`."""
    process = family.process
    assert process is not None
    body = f"{tag}-v{index}"
    family.write_config(body)
    before = our_envoys(family)
    sent = time.monotonic()
    process.send_signal(signal.SIGHUP)
    try:
        served = family.wait_body(body, timeout_s=STEP_TIMEOUT_S)
        wait_for(
            lambda: True if not any(family.owns(pid) for pid in before) else None,
            timeout_s=STEP_TIMEOUT_S,
            what="upstream's previous Envoy to exit",
        )
    except BenchError as err:
        raise BenchError(f"{err}\n--- upstream log ---\n{upstream_tail(family)}") from None
    if process.poll() is not None:
        raise BenchError(f"hot-restarter.py exited ({process.returncode})\n{upstream_tail(family)}")
    return served - sent


def change_contender(contender: Contender, index: int) -> None:
    if contender.options is None:
        contender.reactions.append(one_upstream_change(contender.family, index, contender.tag))
        return
    sample = one_change(contender.family, index, contender.tag, contender.epoch)
    contender.epoch = sample.epoch
    contender.samples.append(sample)
    contender.reactions.append(sample.total - contender.debounce_s)


SUBJECTS: Final = ("shipped", "validating", "novalidate", "upstream")


def make_contenders(
    envoy: Path, no_validate: bool, subjects: tuple[str, ...] = SUBJECTS, rotate: int = 0
) -> list[Contender]:
    """The subjects (by tag), each with its own family (base id, ports, temp directory);
    `rotate` shifts which subject gets which of the base ids picked."""
    fast = ("--debounce", str(SIDE_DEBOUNCE_S))
    wanted: list[tuple[str, str, tuple[str, ...] | None]] = [
        ("daemon as shipped", "shipped", ()),
        ("daemon validating", "validating", fast),
        ("upstream hot-restarter.py", "upstream", None),
    ]
    if no_validate:
        wanted.insert(2, ("daemon --no-validate", "novalidate", (*fast, "--no-validate")))
    wanted = [w for w in wanted if w[1] in subjects]
    base_ids = pick_base_ids(len(wanted))
    shift = rotate % len(base_ids)
    contenders: list[Contender] = []
    for base_id, (name, tag, options) in zip(
        base_ids[shift:] + base_ids[:shift], wanted, strict=True
    ):
        family = BenchFamily(base_id, envoy=envoy)
        debounce_s = DEFAULT_DEBOUNCE_S if options == () else SIDE_DEBOUNCE_S
        if options is not None:
            options = (*options, *daemon_options(family))
        contenders.append(Contender(name, family, options, tag, debounce_s))
    return contenders


@dataclass(frozen=True, slots=True)
class SideBySide:
    """What the side-by-side run measured: each session's contenders (fresh families,
    daemons and Envoys per session), and all of a subject's rounds pooled."""

    sessions: list[list[Contender]]

    @property
    def pooled(self) -> list[Contender]:
        first = self.sessions[0]
        return [
            dataclasses.replace(
                contender,
                reactions=[r for s in self.sessions for r in s[i].reactions],
                samples=[x for s in self.sessions for x in s[i].samples],
            )
            for i, contender in enumerate(first)
        ]

    def per_session(self, name: str) -> list[tuple[list[float], list[float]]]:
        """(the daemon's, upstream's) rounds of each session where both ran."""
        pairs = []
        for session in self.sessions:
            by_name = {c.name: c.reactions for c in session}
            daemon, upstream = by_name.get(name), by_name.get("upstream hot-restarter.py")
            if daemon and upstream and len(daemon) == len(upstream):
                pairs.append((daemon, upstream))
        return pairs


def side_by_side(
    changes: int,
    envoy: Path,
    no_validate: bool,
    sessions: int = 1,
    subjects: tuple[str, ...] = SUBJECTS,
) -> SideBySide:
    """`sessions` times: all contenders up at once on fresh families, their changes
    alternating, the order rotating each round (no subject always follows the same
    one). Each session hands the base ids out shifted by one. Always cleans up."""
    done: list[list[Contender]] = []
    for session in range(sessions):
        contenders: list[Contender] = []
        try:
            contenders = make_contenders(envoy, no_validate, subjects, rotate=session)
            for contender in contenders:
                start_contender(contender)
            for index in range(1, changes + 1):
                shift = index % len(contenders)
                for contender in contenders[shift:] + contenders[:shift]:
                    change_contender(contender, index)
                figures = ", ".join(f"{c.tag} {c.reactions[-1] * 1000:6.1f}" for c in contenders)
                print(
                    f"  [side by side, session {session + 1}/{sessions}]"
                    f" round {index:>3}/{changes}: {figures} ms",
                    flush=True,
                )
            done.append(contenders)
        finally:
            for contender in contenders:
                contender.family.close()
    return SideBySide(done)


def ratio(contenders: list[Contender], name: str) -> float | None:
    """The daemon's median over upstream's, or None when either did not run."""
    medians = {c.name: summary(c.reactions)["median"] for c in contenders if c.reactions}
    upstream = medians.get("upstream hot-restarter.py")
    daemon = medians.get(name)
    return None if upstream is None or daemon is None else daemon / upstream


def paired(side: SideBySide, name: str) -> dict[str, float] | None:
    """The same comparison round by round (`sessions_ratio`): Envoy's own start varies
    by more than the daemon's margin (about 2 ms of ~50-100), so one ratio of medians
    falls either side of 1.0 from run to run."""
    per_session = side.per_session(name)
    return sessions_ratio(per_session) if per_session else None


# -- output ------------------------------------------------------------------------------
def phase_tables(runs: list[Run]) -> tuple[list[list[str]], list[list[str]]]:
    rows: list[list[str]] = []
    detail_rows: list[list[str]] = []
    for result in runs:
        for phase, st in result.stats().items():
            note = " (off)" if phase == "validation" and result.validation == "off" else ""
            first = phase in ("total", DETAIL[0])
            (rows if phase in PHASES else detail_rows).append(
                [
                    result.label if first else "",
                    phase + note,
                    *(f"{st[k] * 1000:.1f}" for k in ("median", "p95", "min", "max")),
                ]
            )
    return rows, detail_rows


def print_side_by_side(side: SideBySide, changes: int) -> dict[str, Json]:
    contenders = side.pooled
    header = ["subject", "measures", "median", "p95", "min", "max"]
    rows = [
        [
            c.name,
            "SIGHUP to served" if c.is_upstream else "rename to served - debounce",
            *(f"{summary(c.reactions)[k] * 1000:.1f}" for k in ("median", "p95", "min", "max")),
        ]
        for c in contenders
    ]
    sessions = len(side.sessions)
    print()
    print(
        f"Side by side, alternating ({changes} changes each"
        + (f", in each of {sessions} sessions of fresh families" if sessions > 1 else "")
        + "), ms"
    )
    print(format_table(header, rows))
    result: dict[str, Json] = {"sessions": sessions}
    for name, key in (
        ("daemon --no-validate", "ratio_no_validate"),
        ("daemon validating", "ratio_validating"),
        ("daemon as shipped", "ratio_as_shipped"),
    ):
        value = ratio(contenders, name)
        result[key] = value
        if value is None:
            continue
        print(f"ratio of medians, {name} / upstream: {value:.3f}", end="")
        by_round = paired(side, name)
        result[f"{key}_paired"] = dict(by_round) if by_round else None
        if by_round:
            print(
                f" (95% interval {by_round['ci95_low']:.3f}"
                f"-{by_round['ci95_high']:.3f};"
                f" median of round ratios {by_round['median_of_round_ratios']:.3f})",
                end="",
            )
        print()
        if sessions > 1:
            each = [ratio(session, name) for session in side.sessions]
            result[f"{key}_by_session"] = [*each]
            print("  by session: " + ", ".join("-" if r is None else f"{r:.3f}" for r in each))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--changes", type=int, default=20, help="renames per run (default 20)")
    parser.add_argument("--envoy", type=Path, default=ENVOY_BIN, help="the Envoy binary")
    parser.add_argument(
        "--runs",
        choices=("all", "default", "side-by-side"),
        default="all",
        help="the default-debounce run, the side-by-side run against upstream, or both",
    )
    parser.add_argument(
        "--sessions",
        type=int,
        default=1,
        help="side by side: this many sessions, each on fresh families (default 1)",
    )
    parser.add_argument(
        "--subjects",
        nargs="+",
        choices=SUBJECTS,
        default=list(SUBJECTS),
        help="side by side: who runs (upstream always does)",
    )
    args = parser.parse_args()
    stop_on_sigterm()
    if args.changes < 1 or args.sessions < 1:
        parser.error("--changes and --sessions must be at least 1")

    env = environment(args.envoy)
    no_validate = daemon_has_option("--no-validate")
    env["daemon_has_no_validate_option"] = no_validate
    runs: list[Run] = []
    if args.runs in ("all", "default"):
        runs.append(run(args.changes, None, args.envoy))
    side: SideBySide | None = None
    if args.runs in ("all", "side-by-side"):
        subjects = tuple({*args.subjects, "upstream"})
        side = side_by_side(args.changes, args.envoy, no_validate, args.sessions, subjects)
        runs += [c.run() for c in side.pooled if not c.is_upstream]
    report(args.changes, env, runs, side)
    return 0


def report(
    changes: int, env: dict[str, Json], runs: list[Run], side_run: SideBySide | None
) -> None:
    env["loadavg_at_end"] = [*os.getloadavg()]
    rows, detail_rows = phase_tables(runs)
    header = ["run", "phase", "median", "p95", "min", "max"]
    print()
    print(f"Reaction latency, rename to new body served ({changes} changes per run), ms")
    print(format_table(header, rows))
    print()
    print("Where the overhead goes (daemon log timestamps vs. first new body), ms")
    print(format_table(header, detail_rows))
    extra = [s for r in runs for s in r.samples if s.restarts != 1 or s.requests != 1]
    if extra:
        print(f"\nNOTE: {len(extra)} change(s) did not make exactly one request and one restart")
    side: dict[str, Json] = {}
    if side_run is not None:
        side = print_side_by_side(side_run, changes)
        side["contenders"] = [c.to_json() for c in side_run.pooled]
    print(f"\nload average at start {env['loadavg_at_start']}, at end {env['loadavg_at_end']}")
    path = write_results(
        "latency",
        {
            "bench": "latency",
            "changes": changes,
            "environment": env,
            "runs": [r.to_json() for r in runs],
            "side_by_side": side or None,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    sys.exit(main())
