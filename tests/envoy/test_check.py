"""`--check` for a good and a bad setup: what it prints and its exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.envoy.conftest import ENVOY_BIN, EnvoyFamily


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "envoy_autoreload", "--check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _lines(result: subprocess.CompletedProcess[str], status: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(status)]


def test_check_on_a_good_setup_says_ok_and_starts_nothing(envoy_family: EnvoyFamily) -> None:
    result = _check(
        "--envoy",
        str(ENVOY_BIN),
        "--watch",
        str(envoy_family.root),
        "--config",
        str(envoy_family.config),
        str(envoy_family.script),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "passes --restart-epoch" in out
    assert "version 1.40" in out and "hot-restart version 11.104" in out
    assert f"{envoy_family.config} validates" in out
    assert "directories: 1" in out and "inotify watches:" in out
    assert "fs.inotify.max_user_watches" in out or "user.max_inotify_watches" in out
    assert out.rstrip().endswith("(0 failing, 0 warnings)")
    assert envoy_family.body() is None, "nothing was started"


def test_check_on_a_bad_setup_names_each_problem_and_exits_1(
    envoy_family: EnvoyFamily, tmp_path: Path
) -> None:
    envoy_family.write_raw("admin: [unclosed\n")
    script = tmp_path / "start.sh"
    script.write_text(f"#!/bin/sh\n{ENVOY_BIN} -c {envoy_family.config} --use-dynamic-base-id\n")
    script.chmod(0o755)
    result = _check(
        "--envoy",
        str(ENVOY_BIN),
        "--watch",
        str(tmp_path / "nowhere"),
        "--config",
        str(envoy_family.config),
        str(script),
    )
    assert result.returncode == 1
    fails = _lines(result, "FAIL")
    assert len(fails) == 1 and "validation failed" in fails[0] and "yaml-cpp" in fails[0]
    warnings = "\n".join(_lines(result, "warn"))
    assert "--restart-epoch" in warnings
    assert "--use-dynamic-base-id without --base-id-path" in warnings
    assert "no `exec`" in warnings
    assert "nowhere does not exist" in warnings
    assert "would fail" in result.stdout.splitlines()[-1]


def test_check_with_a_missing_start_script_fails_with_exit_1(tmp_path: Path) -> None:
    result = _check("--envoy", str(ENVOY_BIN), str(tmp_path / "missing.sh"))
    assert result.returncode == 1
    fails = _lines(result, "FAIL")
    assert len(fails) == 1 and "missing.sh does not exist" in fails[0]


def test_check_on_a_config_that_is_not_utf8_reports_it_without_a_traceback(
    envoy_family: EnvoyFamily,
) -> None:
    # Envoy's yaml-cpp passes invalid UTF-8 in a comment through: it validates and serves.
    envoy_family.config.write_bytes(envoy_family.config.read_bytes() + b"# caf\xe9\n")
    result = _check(
        "--envoy", str(ENVOY_BIN), "--config", str(envoy_family.config), str(envoy_family.script)
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stdout + result.stderr
    (warned,) = [line for line in _lines(result, "warn") if "cannot parse" in line]
    assert str(envoy_family.config) in warned
    assert f"{envoy_family.config} validates" in result.stdout
