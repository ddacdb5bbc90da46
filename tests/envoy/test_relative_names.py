"""A config naming files relatively, with the start script `cd`ing elsewhere: Envoy takes
them from its own working directory, the daemon validates and watches them from its own.
The daemon cannot see Envoy's before it runs, so it says so: a start-up refusal that
names such a file says where it was looked for, `--check` warns, and the first LIVE of
an Envoy in another directory is a `config.relative_paths` warning naming both."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon import one_error_line, run_cli
from tests.envoy.conftest import EnvoyFamily
from tests.helpers import wait_until

BODY_FILE = "body.txt"


@pytest.fixture
def elsewhere(envoy_family: EnvoyFamily, tmp_path: Path) -> Path:
    """The daemon's working directory; the start script runs Envoy in the family's."""
    text = envoy_family.render("unused").replace(
        'body: { inline_string: "unused" }', f'body: {{ filename: "{BODY_FILE}" }}'
    )
    assert BODY_FILE in text
    envoy_family.write_raw(text)
    envoy_family.write_script(prelude=f"cd {envoy_family.root}\n")
    (envoy_family.root / BODY_FILE).write_text("envoy's directory")
    daemon_cwd = tmp_path / "daemon-cwd"
    daemon_cwd.mkdir()
    return daemon_cwd


def test_a_refusal_says_where_a_relative_file_was_looked_for(
    envoy_family: EnvoyFamily, elsewhere: Path
) -> None:
    result = run_cli([*envoy_family.watched(), str(envoy_family.script)], cwd=elsewhere)
    assert result.returncode == 3, result.stderr
    line = one_error_line(result.stderr)
    assert line.endswith(
        f"file {BODY_FILE} does not exist ({BODY_FILE}: relative, so looked for in the "
        f"daemon's working directory, {elsewhere}; Envoy takes it from its own)"
    ), line
    assert not envoy_family.our_processes()


def test_check_warns_of_relative_names(envoy_family: EnvoyFamily, elsewhere: Path) -> None:
    (elsewhere / BODY_FILE).write_text("the daemon's directory")
    result = run_cli(["--check", *envoy_family.watched(), str(envoy_family.script)], cwd=elsewhere)
    assert result.returncode == 0, result.stdout + result.stderr
    warned = [line for line in result.stdout.splitlines() if "relative paths" in line]
    assert warned == [
        f"warn  config        the config names relative paths ({BODY_FILE}), which Envoy "
        f"takes from its working directory; the daemon validates and watches them from "
        f"its own, {elsewhere}. Keep the two the same (systemd WorkingDirectory=, no `cd` "
        "in the start script) or name them absolutely"
    ], result.stdout


def test_an_envoy_in_another_directory_is_a_warning_at_live(
    envoy_family: EnvoyFamily, elsewhere: Path
) -> None:
    """Both directories hold the file, so the validation passes where Envoy's start
    reads the other one: what it serves is from its own directory."""
    (elsewhere / BODY_FILE).write_text("the daemon's directory")
    daemon = envoy_family.start_script(envoy_family.script, *envoy_family.watched(), cwd=elsewhere)
    daemon.wait_event("child.serving", epoch=0, timeout_s=60)
    warning = daemon.wait_event("config.relative_paths", timeout_s=30)
    assert warning["epoch"] == 0
    assert (
        f"Envoy runs in {envoy_family.root}, the daemon, which validates and watches them, "
        f"in {elsewhere}"
    ) in str(warning["message"]), warning
    wait_until(
        lambda: envoy_family.body() == "envoy's directory", timeout_s=30, what="Envoy's file"
    )
