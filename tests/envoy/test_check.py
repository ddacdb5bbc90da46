"""`--check` for a good and a bad setup: what it prints and its exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _snapshot_script(family: EnvoyFamily, where: Path) -> Path:
    """The family's start script as the examples write it: starting the validated snapshot."""
    script = where / "start_snapshot.sh"
    script.write_text(
        f'#!/bin/sh\nexec {ENVOY_BIN} -c "${{ENVOY_AUTORELOAD_SNAPSHOT:-{family.config}}}" '
        f'--restart-epoch "$RESTART_EPOCH" --base-id {family.base_id}\n'
    )
    script.chmod(0o755)
    return script


def test_check_on_a_good_setup_says_ok_and_starts_nothing(
    envoy_family: EnvoyFamily, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    state = tmp_path_factory.mktemp("outside-the-watch") / "state"
    script = _snapshot_script(envoy_family, tmp_path)
    result = _check(
        "--envoy",
        str(ENVOY_BIN),
        "--watch",
        str(envoy_family.root),
        "--config",
        str(envoy_family.config),
        "--state-dir",
        str(state),
        str(script),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "passes --restart-epoch" in out
    assert f"{script} starts the validated snapshot ($ENVOY_AUTORELOAD_SNAPSHOT)" in out
    assert f"{state}: will be created for generations" in out
    assert not state.exists(), "--check creates nothing"
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


def _check_state(
    family: EnvoyFamily, state: Path | None, script: Path
) -> subprocess.CompletedProcess[str]:
    """--check with --config, and --state-dir if given, else systemd's $STATE_DIRECTORY."""
    given = ("--state-dir", str(state)) if state is not None else ()
    return _check("--envoy", str(ENVOY_BIN), "--config", str(family.config), *given, str(script))


def test_check_warns_when_the_state_dir_cannot_be_used_and_still_exits_0(
    envoy_family: EnvoyFamily, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    script = _snapshot_script(envoy_family, tmp_path)
    under_a_file = _check_state(envoy_family, blocker / "state", script)
    # --state-dir refuses a file itself; systemd's $STATE_DIRECTORY (the default) is not
    # checked by the option parser, so --check must say it.
    monkeypatch.delenv("ENVOY_AUTORELOAD_STATE_DIR", raising=False)
    monkeypatch.setenv("STATE_DIRECTORY", str(blocker))
    a_file = _check_state(envoy_family, None, script)
    for result, state, why in (
        (under_a_file, blocker / "state", f"cannot be created: {blocker} is not a directory"),
        (a_file, blocker, "not a directory"),
    ):
        assert result.returncode == 0, result.stdout + result.stderr
        (warned,) = _lines(result, "warn")
        assert warned.split()[1] == "state", warned
        assert warned.endswith(
            f"{state}: {why}: generations are off: no config history, exact start or "
            "rollback; give --state-dir DIR"
        ), warned
        assert result.stdout.rstrip().endswith("verdict: ok (0 failing, 1 warnings)")
    assert blocker.read_text() == "not a directory\n"


def test_check_names_the_pid_in_the_lock_and_neither_takes_nor_changes_it(
    envoy_family: EnvoyFamily, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    lock = state / "lock"
    lock.write_text(f"{os.getpid()}\n")
    result = _check_state(envoy_family, state, _snapshot_script(envoy_family, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = [line for line in _lines(result, "ok") if line.split()[1] == "state"]
    assert line.endswith(
        f"{state}: generations are kept here; its lock names PID {os.getpid()}, which is "
        "running (a daemon uses it)"
    ), line
    assert sorted(p.name for p in state.iterdir()) == ["lock"]
    assert lock.read_text() == f"{os.getpid()}\n"


def test_check_warns_when_the_start_script_ignores_the_snapshot(
    envoy_family: EnvoyFamily, tmp_path: Path
) -> None:
    envoy_family.write_script(snapshot=False)  # a drop-in script: -c of the file on disk
    result = _check_state(envoy_family, tmp_path / "state", envoy_family.script)
    assert result.returncode == 0, result.stdout + result.stderr
    (warned,) = _lines(result, "warn")
    assert warned.split()[1:3] == ["start", "script"], warned
    assert (
        f"{envoy_family.script} does not use $ENVOY_AUTORELOAD_SNAPSHOT: Envoy starts what is on "
        "disk, not the snapshot that was validated, so the exact-start guarantee and rollback "
        "are off" in warned
    ), warned
    assert warned.endswith(f'write -c "${{ENVOY_AUTORELOAD_SNAPSHOT:-{envoy_family.config}}}"')
    assert result.stdout.rstrip().endswith("verdict: ok (0 failing, 1 warnings)")
    # Without --config nothing is snapshotted: nothing to say about the script.
    bare = _check("--envoy", str(ENVOY_BIN), str(envoy_family.script))
    assert "ENVOY_AUTORELOAD_SNAPSHOT" not in bare.stdout, bare.stdout
    assert "no --config: no config generations to keep" in bare.stdout
