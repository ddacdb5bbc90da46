"""What an operator reads when start-up fails: one line on stderr naming the culprit and
the reason in the daemon's words, never Envoy's whole output as human lines, never a
traceback; and a first start that fails says so once, with Envoy's own reason, without
a crash-budget count it did not reach.

Lines are counted as a user sees them (stderr, human format), not searched for.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import pytest

from tests.daemon import one_error_line, run_cli
from tests.envoy.conftest import EnvoyFamily
from tests.helpers import free_port

# The daemon's own human lines ("23:10:08.320 ERROR restart.failed ..."); Envoy's pass
# through as they are, and an event's detail follows as "  | " lines.
OWN_LINE: Final = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} ")
ANSWERS_VERSION_ONLY: Final = """\
#!/bin/sh
case "$1" in
--version) echo "envoy  version: 0000/1.40.0/Clean/RELEASE/BoringSSL" ;;
esac
"""


def _impostor(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """A binary that is not Envoy, and the reason the daemon gives."""
    if kind == "bin_true":
        return Path("/bin/true"), "'--version' printed no Envoy version"
    binary = tmp_path / "envoy"
    binary.write_text(ANSWERS_VERSION_ONLY)
    binary.chmod(0o755)
    # Its validation "passes" (exit 0) without Envoy's own words on a valid config.
    return binary, "'--mode validate' printed no \"configuration ... OK\""


@pytest.mark.parametrize("kind", ["bin_true", "version_only"])
def test_an_envoy_that_is_not_envoy_is_exactly_one_line(
    envoy_family: EnvoyFamily, tmp_path: Path, kind: str
) -> None:
    binary, reason = _impostor(kind, tmp_path)
    args = ["--envoy", str(binary), *envoy_family.watched(), str(envoy_family.script)]
    result = run_cli(args)
    assert result.returncode == 2, result.stderr  # README: --envoy not Envoy is USAGE
    assert result.stderr.splitlines() == [
        f"envoy-autoreload: error: {binary} is not Envoy: {reason}"
    ], result.stderr
    assert not envoy_family.our_processes()


def test_a_binary_refused_at_start_up_keeps_its_output_for_the_json_log(
    envoy_family: EnvoyFamily, tmp_path: Path
) -> None:
    args = ["--log-format", "json", "--envoy", "/bin/true", *envoy_family.watched()]
    result = run_cli([*args, str(envoy_family.script)])
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert (
        line
        == "envoy-autoreload: error: /bin/true is not Envoy: '--version' printed no Envoy version"
    )
    events = [json.loads(x) for x in result.stderr.splitlines() if x.startswith("{")]
    assert [e["event"] for e in events] == ["binary.refused"], "no daemon.started"
    assert events[0]["message"] == line.removeprefix("envoy-autoreload: error: ")
    assert "Written by Jim Meyering" in events[0]["output"], "what it printed is the detail"


def test_a_config_that_does_not_validate_is_one_line_with_envoys_reason(
    envoy_family: EnvoyFamily,
) -> None:
    envoy_family.write_raw(
        envoy_family.render("v0").replace("stat_prefix: main", "stat_prefx: main")
    )
    result = run_cli([*envoy_family.watched(), str(envoy_family.script)])
    assert result.returncode == 3, result.stderr
    line = one_error_line(result.stderr)
    assert line.startswith(
        f"envoy-autoreload: error: the config {envoy_family.config} does not validate, so "
        "Envoy is not started: Protobuf message"
    ), line
    assert "no such field" in line and "'stat_prefx'" in line, line
    assert "error initializing configuration" not in line, "the file is named once"
    lines = result.stderr.splitlines()
    assert lines == [line], "a start-up refusal is one line: no daemon.started before it"
    assert not envoy_family.our_processes()


@contextmanager
def _held(port: int) -> Iterator[None]:
    """The family's listener port (from the allocator) held by a socket of the test's."""
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        yield
    finally:
        blocker.close()


def test_epoch_0_that_cannot_bind_at_start_up_says_so_once(envoy_family: EnvoyFamily) -> None:
    """One failure: the daemon (--exit-on-child-failure) ends after it. The failure line
    names Envoy's reason once, and nothing counts failures that did not happen."""
    port = envoy_family.listener_port
    with _held(port):
        args = ["--exit-on-child-failure", "--no-control-socket", *envoy_family.watched()]
        result = run_cli([*args, str(envoy_family.script)])
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    bind_error = f"cannot bind '127.0.0.1:{port}': Address already in use"
    own = [x for x in result.stderr.splitlines() if OWN_LINE.match(x)]
    failed = [x for x in own if bind_error in x]
    assert len(failed) == 1, result.stderr
    assert " ERROR restart.failed " in failed[0], failed
    assert failed[0].endswith(f"epoch 0 failed to start: {bind_error}"), failed
    assert failed[0].count(bind_error) == 1, failed
    assert "failures within" not in result.stderr and "crash_budget" not in result.stderr
    assert not envoy_family.our_processes()


def test_a_status_address_in_use_refuses_start_up_before_any_envoy_runs(
    envoy_family: EnvoyFamily, tmp_path: Path
) -> None:
    """Epoch 0 is spawned as soon as its config validated, before the daemon has
    loaded (head_start.py): what can still refuse start-up is bound before that, or an
    Envoy would start, take the listeners for a moment and be stopped again."""
    port, ran = free_port(), tmp_path / "ran"
    wrapper = tmp_path / "start.sh"
    wrapper.write_text(f'#!/bin/sh\necho "$$" >> {ran}\nexec {envoy_family.script} "$@"\n')
    wrapper.chmod(0o755)
    with _held(port):
        args = ["--status-address", f"127.0.0.1:{port}", "--no-control-socket"]
        result = run_cli([*args, *envoy_family.watched(), str(wrapper)])
    assert result.returncode == 2, result.stderr
    assert one_error_line(result.stderr) == (
        f"envoy-autoreload: error: cannot serve status on 127.0.0.1:{port}: Address already in use"
    )
    assert not ran.exists(), "Envoy was started before the refusal"
    assert not envoy_family.our_processes()
