"""The validation a burst starts ahead (`check_ahead.py`, issue 16), on real Envoy: it
is the burst's verdict only if nothing changed after it began. A file the config names
can change what validates, so a change to it makes the run ahead stale."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from tests.envoy.conftest import ENVOY_BIN, EnvoyFamily
from tests.helpers import wait_until

INLINE = 'body: {{ inline_string: "{body}" }}'
# `--envoy` for the daemon: the real one, and a line per validation once it has ended.
LOGGING_ENVOY = """\
#!/bin/sh
{envoy} "$@"
rc=$?
[ "$1" = --mode ] && echo "$rc $4" >> {calls}
exit $rc
"""


def _validations(calls: Path) -> list[tuple[str, str]]:
    lines = calls.read_text().splitlines() if calls.exists() else []
    return [(rc, path) for rc, _, path in (line.partition(" ") for line in lines)]


def test_a_named_file_deleted_after_its_check_began_ahead_fails_the_burst(
    envoy_family: EnvoyFamily, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The new config names body.txt; its check ahead passes; body.txt is deleted while
    the burst's debounce still runs. Taking that pass would start an Envoy that cannot
    load its config: the burst is judged on the files as they are at its end."""
    outside = tmp_path_factory.mktemp("logging-envoy")
    calls = outside / "calls"
    envoy = outside / "envoy"
    envoy.write_text(
        LOGGING_ENVOY.format(envoy=shlex.quote(str(ENVOY_BIN)), calls=shlex.quote(str(calls)))
    )
    envoy.chmod(0o755)
    body = envoy_family.root / "body.txt"
    body.write_text("from the file")
    daemon = envoy_family.start(
        *envoy_family.watched("--envoy", str(envoy), "--debounce", "1.5", "--health-window", "0")
    )
    daemon.wait_event("child.serving", epoch=0)
    daemon.wait_event("watch.started")
    wait_until(lambda: len(_validations(calls)) == 1, timeout_s=30, what="epoch 0's check")

    text = envoy_family.render("x")
    envoy_family.write_raw(text.replace(INLINE.format(body="x"), f'body: {{ filename: "{body}" }}'))
    wait_until(
        lambda: ("0" in [rc for rc, _ in _validations(calls)[1:]]) or None,
        timeout_s=30,
        what="the new config's check ahead to pass",
    )
    body.unlink()

    failed = daemon.wait_event("validation.failed", timeout_s=60)
    assert "body.txt" in failed["message"], failed
    assert not daemon.events("validation.passed", epoch=0)[1:], "a pass was taken"
    assert not daemon.events("child.started", epoch=1)
    assert envoy_family.body() == "v0"
