"""The start script's spawn: the exact way (fork, PDEATHSIG requested in the child) for
a script file not exec'd before, vfork + `setpriv --pdeathsig` for one that was; both
give the script PR_SET_PDEATHSIG = SIGTERM, and exec failures stay OSErrors."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from envoy_autoreload import child as child_module
from envoy_autoreload.child import ScriptChild, ScriptSpawner
from tests.helpers import pid_alive, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PDEATHSIG")

# The script reports the parent-death signal it runs with (PR_GET_PDEATHSIG = 2).
REPORTER = f"""#!{sys.executable}
import ctypes, sys
value = ctypes.c_int(-1)
ctypes.CDLL(None).prctl(2, ctypes.byref(value))
sys.stderr.write(f"pdeathsig={{value.value}}\\n")
"""


def _run(spawner: ScriptSpawner) -> str:
    """Spawn, wait for the exit, return what the script wrote to stderr."""
    child = spawner.spawn(0)
    lines: list[str] = []
    try:
        child.wait(30)
        assert child.poll() == 0, child.stderr_tail
        child.pump_stderr(lines.append)
    finally:
        child.kill()
        child.close_stderr()
    return "\n".join(lines)


@pytest.fixture
def argvs(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The argv of every spawn, recorded on its way to Popen."""
    seen: list[list[str]] = []
    real = child_module._popen

    def recording(argv: list[str], *rest: object, **kwargs: object) -> object:
        seen.append(list(argv))
        return real(argv, *rest, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(child_module, "_popen", recording)
    return seen


def test_both_ways_give_the_script_pdeathsig_sigterm(
    tmp_path: Path, argvs: list[list[str]]
) -> None:
    script = tmp_path / "start.py"
    script.write_text(REPORTER)
    script.chmod(0o755)
    spawner = ScriptSpawner(script, ())
    for _ in range(3):
        assert _run(spawner) == f"pdeathsig={int(signal.SIGTERM)}"
    assert argvs[0] == [str(script)], "a script not exec'd before: the exact way"
    if child_module._find_setpriv() is None:
        pytest.skip("no setpriv with --pdeathsig here: every spawn takes the exact way")
    assert argvs[1][1:4] == ["--pdeathsig", "TERM", "--"] and argvs[1][4:] == [str(script)]
    assert argvs[2] == argvs[1]


def test_a_changed_script_is_exec_d_the_exact_way_again(
    tmp_path: Path, argvs: list[list[str]]
) -> None:
    script = tmp_path / "start.py"
    script.write_text(REPORTER)
    script.chmod(0o755)
    spawner = ScriptSpawner(script, ())
    _run(spawner)
    script.write_text(REPORTER + "# rewritten\n")
    assert _run(spawner) == f"pdeathsig={int(signal.SIGTERM)}"
    assert argvs[1] == [str(script)]


@pytest.mark.parametrize("mistake", ["deleted", "not_executable", "bad_interpreter"])
def test_a_script_broken_after_a_spawn_is_still_an_oserror(tmp_path: Path, mistake: str) -> None:
    script = tmp_path / "start.py"
    script.write_text(REPORTER)
    script.chmod(0o755)
    spawner = ScriptSpawner(script, ())
    _run(spawner)
    match mistake:
        case "deleted":
            script.unlink()
        case "not_executable":
            script.chmod(0o644)
        case _:
            script.write_text("#!/nonexistent/interpreter\n")
    with pytest.raises(OSError):
        spawner.spawn(1)


SLEEPER = """#!/bin/sh
echo "$$ $ENVOY_AUTORELOAD_SNAPSHOT" >> {starts}
exec sleep 60
"""


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_an_epoch_0_spawned_at_start_up_is_taken_for_its_snapshot_only(tmp_path: Path) -> None:
    """`fire_first` (head_start.py): the supervisor's epoch 0 takes it for the same
    snapshot. For another (a config saved between the two pins) it is killed, and gone
    before the other epoch 0 is spawned: two at once cannot both bind the family's
    sockets (ENVOY_FACTS §0)."""
    starts = tmp_path / "starts"
    script = tmp_path / "start.sh"
    script.write_text(SLEEPER.format(starts=starts))
    script.chmod(0o755)
    spawner = ScriptSpawner(script, ())
    children: list[ScriptChild] = []
    try:
        assert spawner.fire_first(tmp_path / "a.yaml")
        first = spawner.spawn(0, tmp_path / "a.yaml")
        children.append(first)
        assert spawner.discard_fired() is None, "the same start was killed"
        assert spawner.fire_first(tmp_path / "a.yaml")
        wait_until(lambda: len(_lines(starts)) == 2, timeout_s=30, what="the script ran")
        fired_pid = int(_lines(starts)[1].split()[0])
        other = spawner.spawn(0, tmp_path / "b.yaml")
        children.append(other)
        assert not pid_alive(fired_pid), "the epoch 0 fired ahead was not gone yet"
        assert spawner.discard_fired() == fired_pid
    finally:
        for child in children:
            child.kill()
            child.wait(10)
            child.close_stderr()
        spawner.release()
