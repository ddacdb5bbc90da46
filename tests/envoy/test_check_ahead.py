"""The validation a burst starts ahead (`check_ahead.py`, issue 16), on real Envoy: it
runs while the debounce waits, and it is the burst's verdict only about the files as
they are at the burst's end. A file the config names can change what validates: a
change to it makes the run ahead stale, and a named file that is not watched yet (no
event would say it changed) means no run ahead at all. A burst that changes nothing
runs no validation.

The daemon's `--envoy` is a wrapper around the real Envoy that logs each validation:
"start <time> <config>" as it starts and "<rc> <time> <config>" once it ended.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.daemon import Daemon
from tests.envoy.conftest import ENVOY_BIN, EnvoyFamily
from tests.helpers import free_port, holds_for, wait_until

INLINE = 'body: {{ inline_string: "{body}" }}'
LOGGING_ENVOY = """\
#!/bin/sh
[ "$1" = --mode ] && echo "start $(date +%s.%N) $4" >> {calls}
{envoy} "$@"
rc=$?
[ "$1" = --mode ] && echo "$rc $(date +%s.%N) $4" >> {calls}
exit $rc
"""


@dataclass(frozen=True)
class Call:
    what: str  # "start", or the exit status
    at: float  # wall clock
    config: str


@dataclass
class Validations:
    """What the logging `--envoy` saw."""

    log: Path

    def all(self) -> list[Call]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        calls = []
        for line in lines:
            what, at, config = line.split(" ", 2)
            calls.append(Call(what, float(at), config))
        return calls

    def started(self) -> list[Call]:
        return [c for c in self.all() if c.what == "start"]

    def ended(self) -> list[Call]:
        return [c for c in self.all() if c.what != "start"]


@pytest.fixture
def validations(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Validations]:
    outside = tmp_path_factory.mktemp("logging-envoy")
    envoy, log = outside / "envoy", outside / "calls"
    envoy.write_text(
        LOGGING_ENVOY.format(envoy=shlex.quote(str(ENVOY_BIN)), calls=shlex.quote(str(log)))
    )
    envoy.chmod(0o755)
    return envoy, Validations(log)


def _serving(family: EnvoyFamily, envoy: Path, seen: Validations, *extra: str) -> Daemon:
    daemon = family.start(*family.watched("--envoy", str(envoy), "--health-window", "0", *extra))
    daemon.wait_event("child.serving", epoch=0)
    daemon.wait_event("watch.started")
    wait_until(lambda: len(seen.ended()) == 1, timeout_s=30, what="epoch 0's check")
    return daemon


def _naming(family: EnvoyFamily, body: Path) -> str:
    text = family.render("x")
    return text.replace(INLINE.format(body="x"), f'body: {{ filename: "{body}" }}')


def _wall(event: dict[str, object]) -> float:
    stamp = str(event["ts"]).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(stamp).timestamp()


def test_a_named_file_deleted_after_its_check_began_ahead_fails_the_burst(
    envoy_family: EnvoyFamily, validations: tuple[Path, Validations]
) -> None:
    """The new config names body.txt; its check ahead passes; body.txt is deleted while
    the burst's debounce still runs. Taking that pass would start an Envoy that cannot
    load its config: the burst is judged on the files as they are at its end."""
    envoy, seen = validations
    body = envoy_family.root / "body.txt"
    body.write_text("from the file")
    daemon = _serving(envoy_family, envoy, seen, "--debounce", "1.5")

    envoy_family.write_raw(_naming(envoy_family, body))
    wait_until(
        lambda: "0" in [c.what for c in seen.ended()[1:]] or None,
        timeout_s=30,
        what="the new config's check ahead to pass",
    )
    body.unlink()

    failed = daemon.wait_event("validation.failed", timeout_s=60)
    assert "body.txt" in failed["message"], failed
    assert not daemon.events("validation.passed", epoch=0)[1:], "a pass was taken"
    assert not daemon.events("child.started", epoch=1)
    assert envoy_family.body() == "v0"


def test_a_check_runs_ahead_and_is_the_verdict(
    envoy_family: EnvoyFamily, validations: tuple[Path, Validations]
) -> None:
    """One change, one validation, started before the burst was due (default debounce,
    0.3 s), and its verdict is the one the restart goes by."""
    envoy, seen = validations
    daemon = _serving(envoy_family, envoy, seen)
    envoy_family.write_config("v1")
    daemon.wait_event("child.serving", epoch=1, timeout_s=60)
    requested = daemon.wait_event("restart.requested")
    started = seen.started()[1:]
    assert len(started) == 1, started
    assert started[0].at < _wall(requested), "validated only after the burst was due"
    assert envoy_family.body() == "v1"


def test_without_validation_the_snapshot_is_still_written_ahead(
    envoy_family: EnvoyFamily, validations: tuple[Path, Validations]
) -> None:
    """`--no-validate`: nothing runs ahead, but the snapshot the start pins is written
    while the debounce (0.3 s) waits, not on the way from the burst to the spawn."""
    envoy, seen = validations
    daemon = envoy_family.start(
        *envoy_family.watched("--envoy", str(envoy), "--health-window", "0", "--no-validate")
    )
    daemon.wait_event("child.serving", epoch=0)
    daemon.wait_event("watch.started")
    envoy_family.write_config("v1")
    started = daemon.wait_event("child.started", epoch=1, timeout_s=60)
    requested = daemon.wait_event("restart.requested")
    state = envoy_family.root.parent / f"{envoy_family.root.name}.daemon0.state"
    (snapshot,) = (state / "generations").glob(f"{started['config']}*.yaml")
    assert snapshot.stat().st_mtime < _wall(requested) - 0.15, "written after the burst was due"
    assert seen.started() == [], "nothing was validated"
    daemon.wait_event("child.serving", epoch=1, timeout_s=60)
    assert envoy_family.body() == "v1"


def test_no_check_ahead_for_a_named_file_not_watched_yet(
    envoy_family: EnvoyFamily,
    validations: tuple[Path, Validations],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A push writes a config naming a file outside the watched tree, then that file:
    no event would tell a run ahead that it changed (it is watched once a config
    naming it passed), so nothing runs before the burst is due, and the push serves."""
    envoy, seen = validations
    body = tmp_path_factory.mktemp("outside-the-watch") / "body.txt"
    daemon = _serving(envoy_family, envoy, seen, "--debounce", "1.5")
    envoy_family.write_raw(_naming(envoy_family, body))
    holds_for(lambda: len(seen.started()) == 1, duration_s=0.8, what="no validation ahead")
    body.write_text("from the file")
    daemon.wait_event("child.serving", epoch=1, timeout_s=60)
    assert not daemon.events("validation.failed")
    wait_until(lambda: envoy_family.body() == "from the file", timeout_s=30, what="served")


def test_a_burst_that_changes_nothing_runs_no_validation(
    envoy_family: EnvoyFamily, validations: tuple[Path, Validations]
) -> None:
    """`touch` (config management re-applying the same bytes): events, no change."""
    envoy, seen = validations
    _serving(envoy_family, envoy, seen, "--debounce", "0.2")
    for _ in range(3):
        os.utime(envoy_family.config)
        holds_for(lambda: len(seen.started()) == 1, duration_s=0.5, what="no validation")


def test_an_access_log_the_check_creates_does_not_make_it_stale(
    envoy_family: EnvoyFamily, validations: tuple[Path, Validations]
) -> None:
    """A config that first names an access log inside the watched tree: `--mode
    validate` creates the log, an event the run ahead would take for a change. Its first
    change is validated once, at the burst's end; once the log is excluded (the config
    passed), the next change is validated once too, ahead."""
    envoy, seen = validations
    log = envoy_family.root / "access.log"
    daemon = _serving(envoy_family, envoy, seen)
    envoy_family.write_config("v1", access_log=log)
    daemon.wait_event("child.serving", epoch=1, timeout_s=60)
    assert len(seen.started()) == 2, seen.all()
    assert len(daemon.events("restart.requested")) == 1

    envoy_family.write_config("v2", access_log=log)
    daemon.wait_event("child.serving", epoch=2, timeout_s=60)
    assert len(seen.started()) == 3, seen.all()
    requested = daemon.events("restart.requested")
    assert len(requested) == 2
    assert seen.started()[2].at < _wall(requested[1]), "not validated ahead"


def _judged_at_the_end(daemon: Daemon, seen: Validations, gone: Path) -> None:
    """No run ahead while the debounce (1.5 s) waits; `gone` is deleted within it; the
    burst's own check, at its end, finds it missing."""
    holds_for(lambda: len(seen.started()) == 1, duration_s=0.8, what="no validation ahead")
    gone.unlink()
    failed = daemon.wait_event("validation.failed", timeout_s=60)
    assert gone.name in failed["message"], failed
    assert not daemon.events("child.started", epoch=1)


def test_no_check_ahead_for_a_named_file_whose_events_are_ignored(
    envoy_family: EnvoyFamily, validations: tuple[Path, Validations]
) -> None:
    """`--ignore 'body.*'`: the named file is in the tree, but its events are dropped."""
    envoy, seen = validations
    body = envoy_family.root / "body.txt"
    body.write_text("from the file")
    daemon = _serving(envoy_family, envoy, seen, "--debounce", "1.5", "--ignore", "body.*")
    envoy_family.write_raw(_naming(envoy_family, body))
    _judged_at_the_end(daemon, seen, body)


def test_no_check_ahead_under_a_config_yaml_overlay(
    envoy_family: EnvoyFamily,
    validations: tuple[Path, Validations],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The start script gives Envoy `--config-yaml`, whose named files are not looked at:
    here a listener answering from a file outside the watch."""
    envoy, seen = validations
    body = tmp_path_factory.mktemp("overlay") / "body.txt"
    body.write_text("from the overlay")
    listener = yaml.safe_load(envoy_family.render("x"))["static_resources"]["listeners"][0]
    listener["name"] = "overlay"
    listener["address"]["socket_address"]["port_value"] = free_port()
    route = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    route["virtual_hosts"][0]["routes"][0]["direct_response"]["body"] = {"filename": str(body)}
    overlay = json.dumps({"static_resources": {"listeners": [listener]}})
    script = envoy_family.script.read_text()
    envoy_family.script.write_text(
        script.replace("--log-level info", f"--log-level info --config-yaml {shlex.quote(overlay)}")
    )
    daemon = _serving(envoy_family, envoy, seen, "--debounce", "1.5")
    envoy_family.write_config("v1")
    _judged_at_the_end(daemon, seen, body)
