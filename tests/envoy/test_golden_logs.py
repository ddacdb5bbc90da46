"""Golden log sequences: the daemon's own events, in order, for five everyday scenarios.

The core is being restructured (supervisor.py split into modules); behaviour and log
events must not change with it. Each scenario below drives the real daemon and the real
Envoy and reduces the JSON log to a sequence of (event, level, sorted field names). That
sequence must equal the one recorded in `golden/<scenario>.json` from the code before the
restructuring (commit ce83050). On a mismatch the test prints a unified diff, golden
first, then the daemon's log.

What is compared, and what is left out:

- Only the daemon's own events. `envoy.output` (Envoy's own stderr lines, wrapped) is
  Envoy's to change, and depends on its timing; DEBUG events are raw watcher detail.
- Field names, not values: PIDs, times and durations differ at every run.
- Events whose presence or count depends on timing, listed in `TIMING_DEPENDENT` with
  the reason. The list is empty: each scenario was recorded three times on ce83050 and
  the runs agreed event for event, and so did six more runs of the comparison against
  that tree (four idle, two with both cores kept busy). Races were designed out of the
  scenarios instead of dropped from the sequence:
  - SIGTERM only after the old epoch's `child.exited`: sent during the drain, that exit
    would land before `shutdown.started` or inside the shutdown, depending on the drain.
  - Configs are written to `envoy.tmp` and renamed over (`EnvoyFamily.write_raw`), and
    `*.tmp` is filtered: one change is one batch, one `restart.requested`. An in-place
    write (truncate, then write) could be split into two batches on a stalled machine,
    adding a `restart.requested` and a `validation.failed` for the empty file.
  - Each step waits for the event that ends it (`validation.failed` before the good
    write, the second `child.serving` before SIGTERM after a kill).
  Field values are not compared, so a batch's `events`/`count`, PIDs and durations may
  vary; only a field appearing or vanishing is a change.

Re-recording (only on code whose behaviour is the reference). Record against a tree of
its own, so that the daemon and envoy-autoreloadctl import that tree's package, and run
pytest from inside it (`python -m` puts the working directory first on sys.path):

    git worktree add /tmp/golden-base ce83050
    cd /tmp/golden-base
    ENVOY_AUTORELOAD_RECORD_GOLDEN=1 PYTHONPATH=/tmp/golden-base \\
        /work/main/.venv/bin/pytest -p no:cacheprovider /work/main/tests/envoy/test_golden_logs.py
    cd - && git worktree remove --force /tmp/golden-base

With ENVOY_AUTORELOAD_RECORD_GOLDEN=1 each scenario runs RECORD_RUNS times; the files
are written only if every run gives the same sequence (after the drops above), and each
file names the package directory and commit it was recorded from.
"""

from __future__ import annotations

import difflib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final, NamedTuple

import pytest

from tests.daemon import Daemon
from tests.envoy.conftest import EnvoyFamily, MakeFamily
from tests.helpers import wait_until

GOLDEN_DIR: Final = Path(__file__).parent / "golden"
CTL: Final = Path(sys.executable).parent / "envoy-autoreloadctl"
RECORD: Final = os.environ.get("ENVOY_AUTORELOAD_RECORD_GOLDEN") == "1"
RECORD_RUNS: Final = 3

# The keys every JSON line has whatever the event (logs.py JsonFormatter), plus the line
# number tests/daemon.py adds. `epoch` and `pid` are always present too, null or not, so
# they stay: that they are there is part of the format.
ENVELOPE: Final = frozenset({"ts", "level", "event", "message", "line"})

# Never compared, in any scenario.
ALWAYS_DROPPED: Final[dict[str, str]] = {
    "envoy.output": "Envoy's own stderr lines: Envoy's wording and timing, not ours",
}

# Per scenario: events whose presence or count depends on timing, and why. None so far
# (see the module docstring for the runs that showed it and the races designed out).
TIMING_DEPENDENT: Final[dict[str, dict[str, str]]] = {}


class Step(NamedTuple):
    event: str
    level: str
    fields: tuple[str, ...]

    def render(self) -> str:
        return f"{self.event} {self.level} [{', '.join(self.fields)}]"


def sequence(daemon: Daemon, scenario: str) -> list[Step]:
    """The daemon's log reduced to what must not change."""
    dropped = ALWAYS_DROPPED.keys() | TIMING_DEPENDENT.get(scenario, {}).keys()
    steps: list[Step] = []
    for event in daemon.events():
        if event["event"] in dropped or event["level"] == "debug":
            continue
        fields = tuple(sorted(set(event) - ENVELOPE))
        steps.append(Step(str(event["event"]), str(event["level"]), fields))
    return steps


# -- the scenarios ----------------------------------------------------------------------
# Each takes a fresh family serving "v0" and returns its daemon after a clean exit.


def _stop(daemon: Daemon) -> Daemon:
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    return daemon


def _served(family: EnvoyFamily, body: str) -> None:
    wait_until(lambda: family.body() == body, timeout_s=30, what=f"the listener to answer {body}")


def watched_change_served(family: EnvoyFamily) -> Daemon:
    """--watch/--config: a good change is validated and served at epoch 1; SIGTERM."""
    daemon = family.start(*family.watched())
    daemon.wait_event("child.serving", epoch=0)
    family.write_config("v1")
    daemon.wait_event("child.serving", epoch=1)
    _served(family, "v1")
    daemon.wait_event("child.exited", epoch=0)  # the drain ends before we stop
    return _stop(daemon)


def broken_refused_then_good_served(family: EnvoyFamily) -> Daemon:
    """A broken config is refused by validation (epoch 0 keeps serving), then a good one
    is served at epoch 1; SIGTERM."""
    daemon = family.start(*family.watched())
    daemon.wait_event("child.serving", epoch=0)
    family.write_raw("admin: [broken\n")
    daemon.wait_event("validation.failed")
    assert family.body() == "v0"
    family.write_config("v1")
    daemon.wait_event("child.serving", epoch=1)
    _served(family, "v1")
    daemon.wait_event("child.exited", epoch=0)
    return _stop(daemon)


def serving_envoy_killed(family: EnvoyFamily) -> Daemon:
    """The serving Envoy is SIGKILLed: the daemon brings a new one to serving; SIGTERM."""
    daemon = family.start(*family.watched())
    first = daemon.wait_event("child.serving", epoch=0)
    os.kill(int(first["pid"]), signal.SIGKILL)
    daemon.wait_event("child.serving", count=2)
    _served(family, "v0")
    return _stop(daemon)


def drop_in_sighup(family: EnvoyFamily) -> Daemon:
    """Drop-in for upstream's hot-restarter (no --watch, no --config): SIGHUP starts
    epoch 1, which serves; SIGTERM."""
    daemon = family.start()
    daemon.wait_event("child.serving", epoch=0)
    family.write_config("v1")
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("child.serving", epoch=1)
    _served(family, "v1")
    daemon.wait_event("child.exited", epoch=0)
    return _stop(daemon)


def ctl_reload_unchanged(family: EnvoyFamily) -> Daemon:
    """`envoy-autoreloadctl reload` with nothing changed: answered "unchanged", no
    restart; SIGTERM."""
    daemon = family.start(*family.watched())
    daemon.wait_event("child.serving", epoch=0)
    reload = subprocess.run(
        [str(CTL), "--control-socket", str(daemon.log_path.with_suffix(".sock")), "reload"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert reload.returncode == 0 and "unchanged" in reload.stdout, reload
    assert not daemon.events("child.started", epoch=1)
    return _stop(daemon)


SCENARIOS: Final[dict[str, Callable[[EnvoyFamily], Daemon]]] = {
    "watched_change_served": watched_change_served,
    "broken_refused_then_good_served": broken_refused_then_good_served,
    "serving_envoy_killed": serving_envoy_killed,
    "drop_in_sighup": drop_in_sighup,
    "ctl_reload_unchanged": ctl_reload_unchanged,
}


# -- comparing and recording ------------------------------------------------------------


def own_lines(daemon: Daemon) -> list[str]:
    """The daemon's log without Envoy's wrapped lines; anything not JSON (a traceback)
    stays."""
    return [line for line in daemon.lines() if '"event":"envoy.output"' not in line]


def golden_path(scenario: str) -> Path:
    return GOLDEN_DIR / f"{scenario}.json"


def load_golden(scenario: str) -> list[Step]:
    data = json.loads(golden_path(scenario).read_text())
    return [Step(s["event"], s["level"], tuple(s["fields"])) for s in data["steps"]]


def diff(expected: list[Step], actual: list[Step]) -> str:
    return "\n".join(
        difflib.unified_diff(
            [s.render() for s in expected],
            [s.render() for s in actual],
            fromfile="golden",
            tofile="now",
            lineterm="",
        )
    )


def recorded_from() -> dict[str, str]:
    """Which package the daemon imports (same interpreter, environment and working
    directory as the daemon), and the commit of the tree holding it."""
    found = subprocess.run(
        [sys.executable, "-c", "import envoy_autoreload; print(envoy_autoreload.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    package = Path(found.stdout.strip()).parent
    commit = subprocess.run(
        ["git", "-C", str(package), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(package), "status", "--porcelain", "--", "."],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    return {"package": str(package), "commit": commit + ("-dirty" if dirty else "")}


def unstable_events(runs: list[list[Step]]) -> set[str]:
    """Event names whose own steps (count, level, fields) differ between runs."""

    def of(run: list[Step], name: str) -> list[Step]:
        return [step for step in run if step.event == name]

    names = {step.event for run in runs for step in run}
    return {name for name in names if any(of(run, name) != of(runs[0], name) for run in runs)}


def record(scenario: str, runs: list[list[Step]]) -> None:
    first = runs[0]
    assert all(run == first for run in runs), (
        f"{scenario}: the {len(runs)} runs disagree; events whose steps differ: "
        f"{sorted(unstable_events(runs)) or 'none (only their order)'}"
        "\n(if timing explains it, list them in TIMING_DEPENDENT with the reason)\n"
        + "\n\n".join(diff(first, run) for run in runs[1:] if run != first)
    )
    dropped = {**ALWAYS_DROPPED, **TIMING_DEPENDENT.get(scenario, {})}
    document = {
        "scenario": scenario,
        "description": (SCENARIOS[scenario].__doc__ or "").split("\n\n")[0].strip(),
        "recorded_from": recorded_from(),
        "runs": len(runs),
        "dropped": {"debug": "all DEBUG events", **dropped},
        "steps": [{"event": s.event, "level": s.level, "fields": list(s.fields)} for s in first],
    }
    GOLDEN_DIR.mkdir(exist_ok=True)
    golden_path(scenario).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_log_sequence_matches_the_golden_one(scenario: str, make_envoy_family: MakeFamily) -> None:
    run = SCENARIOS[scenario]
    if RECORD:
        record(scenario, [sequence(run(make_envoy_family()), scenario) for _ in range(RECORD_RUNS)])
        return
    daemon = run(make_envoy_family())
    expected, actual = load_golden(scenario), sequence(daemon, scenario)
    assert actual == expected, (
        f"{scenario}: the daemon's log events changed\n{diff(expected, actual)}"
        "\n--- daemon log (without envoy.output) ---\n" + "\n".join(own_lines(daemon))
    )
