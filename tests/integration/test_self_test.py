"""`--self-test`: what the daemon runs with its own arguments before it re-executes in
place, to prove the newly installed code imports, parses them and accepts the settings
they make, while starting nothing at all."""

from __future__ import annotations

from pathlib import Path

from envoy_autoreload import __version__
from tests.daemon import one_error_line, run_cli


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    script = tmp_path / "start.sh"
    script.write_text('#!/bin/sh\necho started >> "$0.ran"\nexec sleep 60\n')
    script.chmod(0o755)
    config = tmp_path / "envoy.yaml"
    config.write_text("admin: {}\n")
    return script, config


def _args(tmp_path: Path, script: Path, config: Path) -> list[str]:
    return [
        "--config",
        str(config),
        "--no-validate",
        "--watch",
        str(config),
        "--state-dir",
        str(tmp_path / "state"),
        "--control-socket",
        str(tmp_path / "control.sock"),
        "--status-address",
        "127.0.0.1:1",  # checked, never bound
        "--",
        str(script),
        "--some-envoy-flag",
    ]


def test_valid_arguments_pass_and_nothing_is_started(tmp_path: Path) -> None:
    script, config = _setup(tmp_path)
    result = run_cli(["--self-test", *_args(tmp_path, script, config)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"self-test ok: envoy-autoreload {__version__}"]
    assert not (tmp_path / "state").exists(), "the state dir is neither created nor locked"
    assert not (tmp_path / "control.sock").exists(), "no control socket"
    assert not (tmp_path / "start.sh.ran").exists(), "the start script never ran"
    assert "daemon.started" not in result.stderr


def test_the_flag_is_hidden_from_help() -> None:
    assert "--self-test" not in run_cli(["--help"]).stdout


def test_an_invalid_flag_value_fails_with_one_line(tmp_path: Path) -> None:
    script, config = _setup(tmp_path)
    args = _args(tmp_path, script, config)
    result = run_cli(["--self-test", "--term-wait", "soon", *args])
    assert result.returncode == 2
    assert "--term-wait" in one_error_line(result.stderr)
    assert "self-test ok" not in result.stdout


def test_settings_a_start_would_refuse_fail_the_self_test(tmp_path: Path) -> None:
    """Each check a start makes before supervising: the start script, the config, the
    state dir outside the watched paths, the status address. --check's leniency (a
    FAIL line, not an error) does not apply."""
    script, config = _setup(tmp_path)
    cases = {
        "START_SCRIPT": [str(tmp_path / "missing.sh")],
        "--config": ["--config", str(tmp_path / "missing.yaml"), "--no-validate", str(script)],
        "--state-dir": [
            *["--watch", str(tmp_path), "--config", str(config), "--no-validate"],
            *["--state-dir", str(tmp_path / "state"), str(script)],
        ],
        "--status-address": ["--status-address", "0.0.0.0:9901", str(script)],
    }
    for needle, args in cases.items():
        for flags in (["--self-test"], ["--self-test", "--check"]):
            result = run_cli([*flags, *args])
            assert result.returncode != 0, (needle, flags, result.stdout)
            assert needle in one_error_line(result.stderr), (needle, result.stderr)
            assert "self-test ok" not in result.stdout
    assert not (tmp_path / "state").exists()


def test_the_arguments_may_come_from_the_environment(tmp_path: Path) -> None:
    """The daemon's own ENVOY_AUTORELOAD_* settings reach its self-test unchanged."""
    script, config = _setup(tmp_path)
    env = {"ENVOY_AUTORELOAD_CONFIG": str(config), "ENVOY_AUTORELOAD_NO_VALIDATE": "1"}
    ok = run_cli(["--self-test", str(script)], env=env)
    assert ok.returncode == 0, ok.stderr
    bad = run_cli(["--self-test", str(script)], env={**env, "ENVOY_AUTORELOAD_DEBOUNCE": "-1"})
    assert bad.returncode == 2
    assert "--debounce" in one_error_line(bad.stderr)
