"""A start script's stderr as the daemon reads it: real processes, real pipes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from envoy_autoreload.child import MAX_PARTIAL_LINE, ScriptSpawner
from tests.helpers import wait_until


def test_output_without_newlines_is_bounded(tmp_path: Path) -> None:
    """REVIEW-core finding 14: a child writing megabytes without a newline used to grow
    the daemon's partial-line buffer without bound."""
    script = tmp_path / "noisy.sh"
    script.write_text(
        f"#!/bin/sh\nexec {sys.executable} -c "
        "\"import sys; sys.stderr.write('x' * 3_000_000); sys.stderr.flush()\"\n"
    )
    script.chmod(0o755)
    child = ScriptSpawner(script, ()).spawn(0)
    lines: list[str] = []
    try:
        wait_until(
            lambda: not child.pump_stderr(lines.append),
            timeout_s=30,
            what="the child's stderr to end",
            interval_s=0.01,
        )
        child.wait(10)
        assert child.poll() == 0
    finally:
        child.kill()
        child.wait(10)
        child.close_stderr()
    assert sum(len(line) for line in lines) == 3_000_000, "nothing may be lost"
    assert max(len(line) for line in lines) <= MAX_PARTIAL_LINE + 65536
    assert len(lines) >= 3_000_000 // (MAX_PARTIAL_LINE + 65536)


def test_the_snapshot_variable_is_the_start_scripts_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script gets the snapshot of its epoch; one an outer supervisor set for us is
    never passed on, and our own environment is not touched."""
    monkeypatch.setenv("ENVOY_AUTORELOAD_SNAPSHOT", "/outer/one.yaml")
    seen = tmp_path / "seen"
    script = tmp_path / "start.sh"
    script.write_text(f'#!/bin/sh\necho "${{ENVOY_AUTORELOAD_SNAPSHOT:-unset}}" >> {seen}\n')
    script.chmod(0o755)
    spawner = ScriptSpawner(script, ())
    for snapshot in (tmp_path / "abc.yaml", None):
        child = spawner.spawn(0, snapshot)
        try:
            child.wait(10)
            assert child.poll() == 0
        finally:
            child.close_stderr()
    assert seen.read_text().split() == [str(tmp_path / "abc.yaml"), "unset"]
    assert os.environ["ENVOY_AUTORELOAD_SNAPSHOT"] == "/outer/one.yaml"
