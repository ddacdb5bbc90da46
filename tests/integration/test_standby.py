"""The standby (standby.py): the next spawn made ahead, then turned into the start
script by one write. What the script gets must be what a direct spawn gives it: the
same environment byte for byte (plus its epoch and snapshot), argv, stdin /dev/null, its
own process group, PDEATHSIG; and a standby must never outlive its use or the daemon."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from envoy_autoreload import child as child_module
from envoy_autoreload import standby as standby_module
from envoy_autoreload.child import SNAPSHOT_VARIABLE, ScriptChild, ScriptSpawner
from tests.helpers import exited, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, PDEATHSIG")


def _environ(pid: int) -> dict[bytes, bytes]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split(b"=", 1) for entry in raw.split(b"\0") if entry)


def _execs(pid: int, program: Path) -> Callable[[], bool]:
    def done() -> bool:
        try:
            return os.readlink(f"/proc/{pid}/exe") == str(program)
        except OSError:
            return False

    return done


@pytest.fixture
def sleeper(tmp_path: Path) -> Path:
    """A start "script" that is `sleep` itself: what it runs with is what the spawner
    passed, no shell of its own in between."""
    target = tmp_path / "start-sleep"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", target)
    return target


@pytest.fixture
def children() -> Iterator[list[ScriptChild]]:
    made: list[ScriptChild] = []
    yield made
    for child in made:
        child.kill()
        child.wait(5)
        child.close_stderr()


def test_a_standby_spawn_is_the_direct_spawn(
    sleeper: Path, children: list[ScriptChild], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IFS", " x")  # what a shell resets on its own
    monkeypatch.setenv("WITH_NEWLINE", "a\nb")
    monkeypatch.setenv("NOT_UTF8", os.fsdecode(b"\xff\xfe"))
    monkeypatch.delenv("PWD", raising=False)  # a shell would add it
    spawner = ScriptSpawner(sleeper, ("30",))
    direct = spawner.spawn(0)
    children.append(direct)
    before = spawner.standby_pid
    assert before is None, "none before a generation went LIVE"
    spawner.prepare()
    standby = spawner.standby_pid
    assert standby is not None
    snapshot = Path("/var/lib/envoy-autoreload/configs/ab cd.yaml")
    fast = spawner.spawn(1, snapshot)
    children.append(fast)
    assert fast.pid == standby and spawner.standby_pid is None
    wait_until(_execs(fast.pid, sleeper), timeout_s=10, what="the script exec'd")
    expected = _environ(direct.pid)
    expected[b"RESTART_EPOCH"] = b"1"
    expected[SNAPSHOT_VARIABLE.encode()] = os.fsencode(snapshot)
    assert _environ(fast.pid) == expected
    assert Path(f"/proc/{fast.pid}/cmdline").read_bytes() == os.fsencode(sleeper) + b"\x0030\x00"
    assert os.readlink(f"/proc/{fast.pid}/fd/0") == "/dev/null"
    assert _fd_flags(fast.pid, 0) == _fd_flags(direct.pid, 0), "stdin opened another way"
    assert os.getpgid(fast.pid) == fast.pid


REPORTER = f"""#!{sys.executable}
import ctypes, os, sys
value = ctypes.c_int(-1)
ctypes.CDLL(None).prctl(2, ctypes.byref(value))
sys.stderr.write(f"pdeathsig={{value.value}} epoch={{os.environ['RESTART_EPOCH']}} "
                 f"snapshot={{os.environ.get('{SNAPSHOT_VARIABLE}')}}\\n")
"""


def _output(child: ScriptChild) -> str:
    lines: list[str] = []
    child.wait(30)
    assert child.poll() == 0, child.stderr_tail
    child.pump_stderr(lines.append)
    return "\n".join(lines)


def test_the_script_writes_our_pipe_and_dies_with_the_daemon(
    tmp_path: Path, children: list[ScriptChild]
) -> None:
    script = tmp_path / "start.py"
    script.write_text(REPORTER)
    script.chmod(0o755)
    spawner = ScriptSpawner(script, ())
    children.append(first := spawner.spawn(0))
    assert _output(first) == f"pdeathsig={int(signal.SIGTERM)} epoch=0 snapshot=None"
    spawner.prepare()
    assert spawner.standby_pid is not None
    children.append(fast := spawner.spawn(1))
    assert _output(fast) == f"pdeathsig={int(signal.SIGTERM)} epoch=1 snapshot=None"


def test_no_standby_where_the_shell_would_change_the_environment(
    sleeper: Path, children: list[ScriptChild], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOT-AN-IDENTIFIER", "1")  # dash drops it
    spawner = ScriptSpawner(sleeper, ("30",))
    children.append(spawner.spawn(0))
    spawner.prepare()
    assert spawner.standby_pid is None
    children.append(child := spawner.spawn(1))
    # /proc/PID/environ is what the last execve got: before the script's, it is the
    # forked daemon's own, which never had the variable (a race on a loaded box).
    wait_until(_execs(child.pid, sleeper), timeout_s=10, what="the script exec'd")
    assert _environ(child.pid)[b"NOT-AN-IDENTIFIER"] == b"1"


def test_the_survey_before_the_first_standby_is_not_named_a_standby(
    sleeper: Path, children: list[ScriptChild], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ps`, and a test looking for the standby, would otherwise take the short-lived
    survey shell forked just before it for the standby itself (a CI failure)."""
    names: list[str] = []
    real_run = subprocess.run

    def run(argv: list[str], **kwargs: Any) -> Any:
        if argv[:2] == [standby_module.SHELL, "-c"]:  # not another module's run
            names.append(argv[3])
        return real_run(argv, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    spawner = ScriptSpawner(sleeper, ("30",))
    children.append(spawner.spawn(0))
    try:
        spawner.prepare()
        assert spawner.standby_pid is not None
        argv = Path(f"/proc/{spawner.standby_pid}/cmdline").read_bytes().split(b"\0")
    finally:
        spawner.release()
    assert names == [standby_module.SURVEY_NAME]
    assert argv[3] == standby_module.NAME.encode() != names[0].encode()


@pytest.mark.parametrize("change", ["rewritten", "killed"])
def test_a_stale_or_dead_standby_is_not_used_and_is_reaped(
    sleeper: Path, children: list[ScriptChild], change: str
) -> None:
    spawner = ScriptSpawner(sleeper, ("30",))
    children.append(spawner.spawn(0))
    spawner.prepare()
    standby = spawner.standby_pid
    assert standby is not None
    if change == "rewritten":
        os.utime(sleeper, ns=(0, 0))  # another mtime: not the file exec'd the exact way
    else:
        os.kill(standby, signal.SIGKILL)
        wait_until(lambda: exited(standby), timeout_s=10, what="the standby killed")
        spawner.reap_strays(set())  # on SIGCHLD: a standby that died is reaped at once
        assert spawner.standby_pid is None and _state(standby) is None
    children.append(child := spawner.spawn(1))
    assert child.pid != standby
    wait_until(_execs(child.pid, sleeper), timeout_s=10, what="the script exec'd")
    assert _environ(child.pid)[b"RESTART_EPOCH"] == b"1"
    spawner.release()
    assert _state(standby) is None, "reaped, not left a zombie"


def _fd_flags(pid: int, fd: int) -> str:
    """The open flags of `fd` in `pid` (octal, from fdinfo)."""
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return line.split()[1]
    raise AssertionError(f"no flags for fd {fd} of {pid}")


def _state(pid: int) -> str | None:
    """The process state letter, None when there is no such process any more."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_release_leaves_nothing(sleeper: Path, children: list[ScriptChild]) -> None:
    spawner = ScriptSpawner(sleeper, ("30",))
    children.append(spawner.spawn(0))
    spawner.prepare()
    standby = spawner.standby_pid
    assert standby is not None
    spawner.release()
    assert spawner.standby_pid is None and _state(standby) is None


def test_a_standby_dies_with_the_daemon(tmp_path: Path) -> None:
    """A daemon SIGKILLed with a standby ready: the standby goes too (EOF, PDEATHSIG)."""
    sleeper = tmp_path / "start-sleep"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", sleeper)
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import os, sys, time
                from pathlib import Path
                from envoy_autoreload.child import ScriptSpawner
                spawner = ScriptSpawner(Path({str(sleeper)!r}), ("0",))
                spawner.spawn(0).wait(10)
                spawner.prepare()
                print(spawner.standby_pid, flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert daemon.stdout is not None
        standby = int(daemon.stdout.readline())
        assert _state(standby) not in (None, "Z")
        daemon.kill()
        daemon.wait(10)
        wait_until(lambda: exited(standby), timeout_s=10, what="the standby gone")
    finally:
        daemon.kill()
        daemon.wait(10)
        if daemon.stdout is not None:
            daemon.stdout.close()


def test_a_standby_that_cannot_be_made_leaves_the_usual_spawn(
    sleeper: Path, children: list[ScriptChild], monkeypatch: pytest.MonkeyPatch
) -> None:
    spawner = ScriptSpawner(sleeper, ("30",))
    children.append(spawner.spawn(0))

    def fails(*_args: object) -> None:
        raise subprocess.SubprocessError("Exception occurred in preexec_fn.")

    monkeypatch.setattr(child_module, "make_standby", fails)
    spawner.prepare()  # does not raise
    assert spawner.standby_pid is None
    children.append(child := spawner.spawn(1))
    wait_until(_execs(child.pid, sleeper), timeout_s=10, what="the script exec'd")


def test_a_start_fired_ahead_is_the_one_spawn_takes(
    sleeper: Path, children: list[ScriptChild]
) -> None:
    """`ready_start.py`: fired into the standby at the burst's deadline; the spawn that
    follows for the same epoch and snapshot is that process, nothing else starts."""
    spawner = ScriptSpawner(sleeper, ("30",))
    children.append(spawner.spawn(0))
    spawner.prepare()
    standby = spawner.standby_pid
    snapshot = Path("/tmp/snapshot.yaml")
    assert spawner.fire_ahead(1, snapshot)
    assert spawner.started_ahead(1) and not spawner.started_ahead(2)
    assert not spawner.fire_ahead(1, snapshot), "one at a time"
    wait_until(_execs(standby or -1, sleeper), timeout_s=10, what="the script exec'd")
    taken = spawner.spawn(1, snapshot)
    children.append(taken)
    assert taken.pid == standby
    assert spawner.discard_fired() is None and not spawner.started_ahead(1)
    assert _environ(taken.pid)[b"RESTART_EPOCH"] == b"1"


@pytest.mark.parametrize("then", ["other_epoch", "not_taken", "release"])
def test_a_start_fired_ahead_and_not_decided_is_killed_and_reported(
    sleeper: Path, children: list[ScriptChild], then: str
) -> None:
    spawner = ScriptSpawner(sleeper, ("30",))
    children.append(spawner.spawn(0))
    spawner.prepare()
    standby = spawner.standby_pid
    assert standby is not None and spawner.fire_ahead(1, Path("/tmp/a.yaml"))
    if then == "other_epoch":
        other = spawner.spawn(2, Path("/tmp/a.yaml"))
        children.append(other)
        assert other.pid != standby
    elif then == "release":
        spawner.release()
    assert spawner.discard_fired() == standby

    def reaped() -> bool:
        spawner.reap_strays(set())  # as on each SIGCHLD
        return _state(standby) is None

    wait_until(reaped, timeout_s=10, what="the fired child killed and reaped")
    assert spawner.discard_fired() is None, "reported once"


def _thread_cpus() -> set[int]:
    return os.sched_getaffinity(0)


def _process_cpus(pid: int) -> set[int]:
    return os.sched_getaffinity(pid)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to hand one over")
def test_a_fired_standby_keeps_the_cpu_it_was_woken_on_until_the_steps_end(
    sleeper: Path, children: list[ScriptChild]
) -> None:
    """The write wakes the script on our CPU; our thread moves off it until the turn's
    steps end (`CpuHandoff`). The script, and any child we spawn, keep every CPU."""
    everything = _thread_cpus()
    spawner = ScriptSpawner(sleeper, ("30",))
    try:
        children.append(spawner.spawn(0))
        spawner.prepare()
        standby = spawner.standby_pid
        assert standby is not None and spawner.fire_ahead(1, Path("/tmp/a.yaml"))
        narrowed = _thread_cpus()
        assert narrowed < everything, "still on every CPU after the fire"
        assert _process_cpus(standby) == everything, "the script must keep every CPU"
        other = spawner.spawn(2, Path("/tmp/b.yaml"))  # not the start fired: a direct spawn
        children.append(other)
        assert _thread_cpus() == everything, "a spawn inherits the narrower set"
        assert _process_cpus(other.pid) == everything
        assert spawner.discard_fired() == standby
    finally:
        spawner.release()
        os.sched_setaffinity(0, everything)  # whatever happened, not the next test's


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to hand one over")
def test_the_end_of_the_steps_gives_every_cpu_back(
    sleeper: Path, children: list[ScriptChild]
) -> None:
    everything = _thread_cpus()
    spawner = ScriptSpawner(sleeper, ("30",))
    try:
        children.append(spawner.spawn(0))
        spawner.prepare()
        assert spawner.fire_ahead(1, Path("/tmp/a.yaml"))
        children.append(spawner.spawn(1, Path("/tmp/a.yaml")))  # taken: the steps' start
        assert spawner.discard_fired() is None  # the end of the turn's steps
        assert _thread_cpus() == everything
    finally:
        spawner.release()
        os.sched_setaffinity(0, everything)
