"""Fault matrix, start-up and the watch: a broken start script or `--envoy`, inotify out of
watches (a real ENOSPC in the test's own user namespace), an unreadable directory.

A mistake found at start-up is one line and exit 2 (the command line) or 3 (the
environment), with no Envoy left running; one found later leaves the serving Envoy
serving. The rows are the README's "What happens when" table.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import assert_one_clear_line, one_error_line, run_cli
from tests.envoy.conftest import EnvoyFamily
from tests.envoy.probe import ServingProbe, serves_after_drain
from tests.helpers import wait_until
from tests.userns import needs_userns, with_inotify_limit


@pytest.mark.parametrize(
    ("mistake", "code", "says"),
    [
        ("missing", 2, "does not exist"),
        ("not_executable", 2, "is not executable"),
        ("bad_interpreter", 3, "cannot execute start script"),
        ("exits_127", 3, "exited 127 (command not found) before Envoy ran"),
    ],
)
def test_a_broken_start_script_fails_start_up_with_one_line(
    envoy_family: EnvoyFamily, mistake: str, code: int, says: str
) -> None:
    script = envoy_family.script
    match mistake:
        case "missing":
            script.unlink()
        case "not_executable":
            script.chmod(0o644)
        case "bad_interpreter":
            script.write_text("#!/nonexistent/interpreter\n")
        case _:
            envoy_family.write_script(prelude="exec /nonexistent/envoy\n")
    result = run_cli([*envoy_family.watched(), str(script)])
    assert result.returncode == code, result.stderr
    line = one_error_line(result.stderr)
    assert says in line and str(script) in line, line
    if mistake == "exits_127":
        assert "/nonexistent/envoy: not found" in line, "the shell's own words"
    assert not envoy_family.our_processes()


def test_a_start_script_without_exec_is_warned_about_and_still_supervised(
    envoy_family: EnvoyFamily,
) -> None:
    envoy_family.script.write_text(envoy_family.script.read_text().replace("exec ", "", 1))
    daemon = envoy_family.start()
    daemon.wait_event("child.serving", epoch=0)
    warning = daemon.wait_event("start_script.no_exec")
    assert_one_clear_line(warning, "exec envoy")
    with ServingProbe(envoy_family.listener_port) as probe:
        envoy_family.write_config("v1")
        daemon.signal(signal.SIGHUP)
        serves_after_drain(daemon, probe, "v1", epoch=1)
    probe.assert_never_failed()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    wait_until(lambda: not envoy_family.our_processes(), timeout_s=15, what="Envoy gone")


@pytest.mark.parametrize("impostor", ["shell_script", "bin_true"])
def test_an_envoy_option_that_is_not_envoy_is_refused_at_start_up(
    envoy_family: EnvoyFamily, tmp_path: Path, impostor: str
) -> None:
    if impostor == "bin_true":
        binary = Path(shutil.which("true") or "/bin/true")
    else:
        binary = tmp_path / "envoy"
        binary.write_text("#!/bin/sh\necho 'hello, I am not a proxy'\n")
        binary.chmod(0o755)
    result = run_cli(["--envoy", str(binary), *envoy_family.watched(), str(envoy_family.script)])
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert line.endswith(f"{binary} is not Envoy: '--version' printed no Envoy version"), line
    assert "not restarting onto it" not in line, "nothing is being restarted at start-up"
    assert not envoy_family.our_processes()


def _watches_needed(family: EnvoyFamily) -> int:
    """What `--check` says this run needs, asked in a namespace of its own."""
    check = subprocess.run(
        [
            *with_inotify_limit(10_000),
            sys.executable,
            "-m",
            "envoy_autoreload",
            "--check",
            *family.watched(),
            str(family.script),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"inotify watches: this run needs (\d+)", check.stdout)
    assert match is not None, check.stdout + check.stderr
    return int(match.group(1))


@needs_userns
def test_inotify_enospc_at_start_up_is_exit_3_with_a_sysctl_line_that_works(
    envoy_family: EnvoyFamily,
) -> None:
    for sub in ("a", "b", "c/d"):
        (envoy_family.root / sub).mkdir(parents=True)
    needed = _watches_needed(envoy_family)
    daemon = envoy_family.start(*envoy_family.watched(), prefix=with_inotify_limit(needed - 2))
    assert daemon.wait_exit(timeout_s=60) == 3
    assert daemon.events("watch.limit_low"), "the start-up check warned first"
    text = "\n".join(daemon.lines())
    assert "Traceback" not in text
    errors = [line for line in daemon.lines() if line.startswith("envoy-autoreload: error:")]
    assert len(errors) == 1, text
    match = re.search(r"sysctl -w (user\.max_inotify_watches)=(\d+)", errors[0])
    assert match is not None and int(match.group(2)) >= needed, errors[0]
    assert "outside the container" in errors[0]
    # Envoy first (issue 16): epoch 0 was spawned before the walk found the limit; it is
    # stopped on the way out, and nothing of it is left.
    assert [e["epochs"] for e in daemon.events("shutdown.leftovers")] == [[0]]
    assert not envoy_family.our_processes(), "no Envoy outlives a failed start-up"
    assert not envoy_family.shm.exists(), "its shared memory is removed"
    # The line works: run it in a namespace of its own and read the limit back.
    applied = subprocess.run(
        [
            "unshare",
            "-U",
            "-r",
            "sh",
            "-c",
            f"{match.group(0)} >/dev/null && cat /proc/sys/user/max_inotify_watches",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert applied.stdout.strip() == match.group(2)


@needs_userns
def test_inotify_enospc_later_keeps_envoy_serving_and_names_what_is_unseen(
    envoy_family: EnvoyFamily,
) -> None:
    needed = _watches_needed(envoy_family)
    daemon = envoy_family.start(*envoy_family.watched(), prefix=with_inotify_limit(needed))
    daemon.wait_event("child.serving", epoch=0)
    with ServingProbe(envoy_family.listener_port) as probe:
        (envoy_family.root / "new" / "deeper").mkdir(parents=True)
        reached = daemon.wait_event("watch.limit_reached")
        assert reached["level"] == "error"
        assert_one_clear_line(reached, "sysctl -w user.max_inotify_watches=")
        assert any(p.endswith(("new", "deeper")) for p in reached["paths"])
        envoy_family.write_config("v1")  # what was watched still is
        serves_after_drain(daemon, probe, "v1", epoch=1)
    probe.assert_never_failed()
    assert daemon.process.poll() is None
    assert "Traceback" not in "\n".join(daemon.lines())


def test_an_unreadable_directory_is_named_and_the_rest_is_watched(
    envoy_family: EnvoyFamily,
) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv")
    secret = envoy_family.root / "secret"
    (secret / "inner").mkdir(parents=True)
    later = envoy_family.root / "later"
    later.mkdir()
    secret.chmod(0o000)
    try:
        # Root reads everything; without the DAC-override capabilities it does not.
        daemon = envoy_family.start(
            *envoy_family.watched(),
            prefix=("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"),
        )
        daemon.wait_event("child.serving", epoch=0)
        warned = daemon.wait_event("watch.unreadable")
        assert warned["level"] == "warning"
        assert warned["paths"] == [str(secret)] and warned["count"] == 1
        assert_one_clear_line(warned, "permission denied")
        with ServingProbe(envoy_family.listener_port) as probe:
            later.chmod(0o000)  # one that becomes unreadable while running
            envoy_family.write_config("v1")  # everything else is watched
            again = daemon.wait_event("watch.unreadable", count=2)
            assert sorted(again["paths"]) == sorted([str(secret), str(later)])
            serves_after_drain(daemon, probe, "v1", epoch=1)
        probe.assert_never_failed()
    finally:
        secret.chmod(0o755)
        later.chmod(0o755)
