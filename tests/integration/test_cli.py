"""The command line as an operator meets it: exit codes, one-line errors, env variables."""

from __future__ import annotations

from pathlib import Path

from tests.daemon import one_error_line, run_cli, start_daemon


def _script(path: Path, body: str, mode: int = 0o755) -> Path:
    path.write_text(body)
    path.chmod(mode)
    return path


def test_options_read_their_environment_variables(tmp_path: Path) -> None:
    script = _script(tmp_path / "start.sh", "#!/bin/sh\nexit 0\n")
    result = run_cli([str(script)], env={"ENVOY_AUTORELOAD_TERM_WAIT": "not-a-number"})
    assert result.returncode == 2
    assert "--term-wait" in result.stderr
    help_text = run_cli(["--help"]).stdout
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


def test_a_state_dir_inside_a_watched_tree_is_one_clear_error(tmp_path: Path) -> None:
    """History writes there would each be a change to restart for: a restart loop."""
    conf = tmp_path / "conf"
    conf.mkdir()
    config = conf / "envoy.yaml"
    config.write_text("admin: {}\n")
    script = tmp_path / "start.sh"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o755)
    args = ["--watch", str(conf), "--config", str(config), "--no-validate"]
    result = run_cli([*args, "--state-dir", str(conf / "state"), str(script)])
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "--state-dir" in line and "inside --watch" in line
