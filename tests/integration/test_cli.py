"""The command line as an operator meets it: exit codes, one-line errors, env variables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.daemon import start_daemon


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "envoy_autoreload", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _script(path: Path, body: str, mode: int = 0o755) -> Path:
    path.write_text(body)
    path.chmod(mode)
    return path


def test_missing_start_script_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    result = _run([str(tmp_path / "nope.sh")])
    assert result.returncode == 2
    assert "nope.sh does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_non_executable_start_script_is_a_usage_error(tmp_path: Path) -> None:
    script = _script(tmp_path / "start.sh", "#!/bin/sh\nexit 0\n", mode=0o644)
    result = _run([str(script)])
    assert result.returncode == 2
    assert "not executable" in result.stderr and str(script) in result.stderr
    assert "Traceback" not in result.stderr


def test_start_script_that_cannot_be_executed_is_a_startup_failure(tmp_path: Path) -> None:
    script = _script(tmp_path / "start.sh", "#!/nonexistent/interpreter\n")
    result = _run([str(script)])
    assert result.returncode == 3
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "cannot execute start script" in error_lines[0]
    assert "Traceback" not in result.stderr


def test_options_read_their_environment_variables(tmp_path: Path) -> None:
    script = _script(tmp_path / "start.sh", "#!/bin/sh\nexit 0\n")
    result = _run([str(script)], env={"ENVOY_AUTORELOAD_TERM_WAIT": "not-a-number"})
    assert result.returncode == 2
    assert "--term-wait" in result.stderr
    help_text = _run(["--help"]).stdout
    assert "ENVOY_AUTORELOAD_TERM_WAIT" in help_text


def test_a_child_that_never_starts_spends_the_crash_budget_and_exits_1(tmp_path: Path) -> None:
    script = _script(tmp_path / "start.sh", "#!/bin/sh\necho 'port 80 busy' >&2\nexit 1\n")
    daemon = start_daemon(["--admin-address", "127.0.0.1:1", str(script)], tmp_path / "d.log")
    try:
        assert daemon.wait_exit(timeout_s=90) == 1
    finally:
        daemon.stop()
    assert len(daemon.events("child.started", epoch=0)) == 5
    delays = [e["in_s"] for e in daemon.events("restart.recovery_scheduled")]
    assert delays == [1.0, 2.0, 4.0, 8.0]
    failed = daemon.events("restart.failed")
    assert "port 80 busy" in failed[0]["message"]
    assert daemon.events("daemon.crash_budget_exhausted")
