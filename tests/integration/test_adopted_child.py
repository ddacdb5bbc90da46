"""`AdoptedChild`: a child known only by its PID and the read end of its stderr pipe, as
the daemon's next image knows its Envoys after re-executing itself in place.

Real processes and pipes. The children are started with `posix_spawn`, not Popen: a
Popen would reap them itself (its `_cleanup` on the next Popen), which is exactly what
an adopted child must never count on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from envoy_autoreload import child as child_module
from envoy_autoreload.child import LOST_EXIT_STATUS, AdoptedChild, ScriptChild, ScriptSpawner
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
SLEEPER = [sys.executable, "-c", "import sys, time; print('up', file=sys.stderr); time.sleep(60)"]


def spawn(argv: list[str], stdin_fd: int | None = None) -> tuple[int, int]:
    """A child in its own process group with its stderr on a new pipe: (pid, read end)."""
    read_end, write_end = os.pipe()
    actions = [(os.POSIX_SPAWN_DUP2, write_end, 2)]
    if stdin_fd is not None:
        actions.append((os.POSIX_SPAWN_DUP2, stdin_fd, 0))
    try:
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions, setpgroup=0)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return pid, read_end


@pytest.fixture(params=["pidfd", "pid"])
def adopted(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each test runs with a pidfd and without one (signals by PID after a poll)."""
    if request.param == "pid":
        monkeypatch.setattr(child_module, "_open_pidfd", lambda pid: None)
    yield "pidfd" if request.param == "pidfd" else "kill"


@pytest.fixture
def signals_sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every signal AdoptedChild sends, recorded and still sent."""
    sent: list[tuple[str, int]] = []
    real_kill, real_killpg, real_pidfd = os.kill, os.killpg, signal.pidfd_send_signal

    def kill(pid: int, signum: int) -> None:
        sent.append(("kill", pid))
        real_kill(pid, signum)

    def killpg(pgid: int, signum: int) -> None:
        sent.append(("killpg", pgid))
        real_killpg(pgid, signum)

    def pidfd_send_signal(fd: int, signum: int, *args: object) -> None:
        sent.append(("pidfd", fd))
        real_pidfd(fd, signum)

    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setattr(os, "killpg", killpg)
    monkeypatch.setattr(signal, "pidfd_send_signal", pidfd_send_signal)
    return sent


def pump_until(child: AdoptedChild | ScriptChild, lines: list[str], count: int) -> None:
    """Pump the child's stderr until `count` lines have come."""

    def enough() -> bool:
        child.pump_stderr(lines.append)
        return len(lines) >= count

    wait_until(enough, timeout_s=20, what=f"{count} lines of stderr", interval_s=0.01)


def finish(child: AdoptedChild) -> None:
    """Never leave the child running or its pipe open, whatever the test did."""
    child.kill()
    child.wait(10)
    child.close_stderr()


@pytest.mark.usefixtures("adopted")
def test_lines_are_pumped_and_the_exit_code_is_kept(tmp_path: Path) -> None:
    stdin_read, stdin_write = os.pipe()
    stdin_open = [stdin_write]
    script = "import sys; print('one', file=sys.stderr); print('two', file=sys.stderr, "
    script += "flush=True); sys.stdin.read(); sys.stderr.write('last'); sys.exit(3)"
    try:
        pid, stderr_fd = spawn([sys.executable, "-c", script], stdin_read)
    finally:
        os.close(stdin_read)
    child = ScriptSpawner(tmp_path / "unused.sh", ()).adopt(pid, stderr_fd)
    lines: list[str] = []
    try:
        assert child.pid == pid and child.stderr_fd() == stderr_fd
        pump_until(child, lines, 2)
        assert lines == ["one", "two"]
        assert (child.poll(), child.returncode) == (None, None)
        os.close(stdin_open.pop())  # the child reads EOF and exits 3
        child.wait(10)
        assert child.poll() == 3 and child.returncode == 3
        assert child.poll() == 3, "the returncode is kept once reaped"
        wait_until(lambda: not child.pump_stderr(lines.append), timeout_s=20, what="EOF on stderr")
        assert lines == ["one", "two", "last"], "the partial last line comes at EOF"
        assert child.last_error_line() == "last"
        assert list(child.stderr_tail) == ["one", "two", "last"]
    finally:
        for fd in stdin_open:
            os.close(fd)
        finish(child)
    assert child.stderr_fd() is None


def test_sigterm_reads_as_minus_15_and_a_reaped_child_is_never_signalled(
    adopted: str, signals_sent: list[tuple[str, int]]
) -> None:
    pid, stderr_fd = spawn(SLEEPER)
    child = AdoptedChild(pid, stderr_fd)
    try:
        pump_until(child, [], 1)
        child.send_signal(signal.SIGTERM)
        assert [how for how, _ in signals_sent] == [adopted]
        child.wait(10)
        assert child.poll() == -signal.SIGTERM
        assert not child.exit_status_lost
        signals_sent.clear()
        child.send_signal(signal.SIGTERM)
        child.signal_envoy(signal.SIGUSR1, None)
        child.kill()
        assert signals_sent == [], "its PID may be another process's now"
    finally:
        finish(child)


@pytest.mark.usefixtures("adopted")
def test_wait_is_bounded_and_kill_reaches_the_group() -> None:
    pid, stderr_fd = spawn(SLEEPER)
    child = AdoptedChild(pid, stderr_fd)
    try:
        started = time.monotonic()
        child.wait(0.3)
        assert 0.25 <= time.monotonic() - started < 3
        assert child.poll() is None
        child.kill()
        child.wait(10)
        assert child.returncode == -signal.SIGKILL
    finally:
        finish(child)


@pytest.mark.usefixtures("adopted")
def test_a_child_reaped_elsewhere_reads_as_lost_and_is_left_alone(
    signals_sent: list[tuple[str, int]],
) -> None:
    pid, stderr_fd = spawn(SLEEPER)
    child = AdoptedChild(pid, stderr_fd)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)  # someone else reaps it: its status is gone
        signals_sent.clear()
        assert child.poll() == LOST_EXIT_STATUS
        assert child.exit_status_lost
        child.send_signal(signal.SIGTERM)
        child.kill()
        assert signals_sent == []
    finally:
        finish(child)


def test_a_pid_that_is_not_our_child_is_never_signalled(
    signals_sent: list[tuple[str, int]],
) -> None:
    child = AdoptedChild(os.getppid(), None)  # pytest's parent: not ours to signal
    assert child.returncode == LOST_EXIT_STATUS and child.exit_status_lost
    child.send_signal(signal.SIGTERM)
    child.kill()
    child.wait(1)
    assert signals_sent == []
    assert child.stderr_fd() is None and not child.pump_stderr()


def test_an_fd_that_is_not_a_pipe_is_refused(tmp_path: Path) -> None:
    with open(tmp_path / "file", "wb") as file, pytest.raises(OSError, match="not a pipe"):
        AdoptedChild(os.getpid(), file.fileno())


def test_script_child_hands_over_the_same_open_fd(tmp_path: Path) -> None:
    script = tmp_path / "start.sh"
    script.write_text("#!/bin/sh\necho hello >&2\nexec sleep 60\n")
    script.chmod(0o755)
    child = ScriptSpawner(script, ()).spawn(0)
    try:
        fd = child.inheritable_stderr_fd()
        assert fd is not None and fd == child.stderr_fd()
        assert os.get_inheritable(fd)
        lines: list[str] = []
        pump_until(child, lines, 1)
        assert lines == ["hello"], "this image still reads it until the exec"
    finally:
        child.kill()
        child.wait(10)
        child.close_stderr()
    assert child.stderr_fd() is None and child.inheritable_stderr_fd() is None
    with pytest.raises(OSError):
        os.fstat(fd)


# The "old image": spawns a start script, hands its stderr over and execs the "new
# image" in place (same PID), which adopts the child and reports what it saw.
OLD_IMAGE = """\
import os, sys
from pathlib import Path
from envoy_autoreload.child import ScriptSpawner
child = ScriptSpawner(Path(sys.argv[1]), ()).spawn(0)
fd = child.inheritable_stderr_fd()
os.execv(sys.executable, [sys.executable, "-c", sys.argv[2], str(child.pid), str(fd)])
"""
NEW_IMAGE = """\
import json, os, signal, sys, time
from envoy_autoreload.child import AdoptedChild
pid, fd = int(sys.argv[1]), int(sys.argv[2])
child = AdoptedChild(pid, fd)
lines = []
deadline = time.monotonic() + 20
while "ready" not in lines and time.monotonic() < deadline:
    child.pump_stderr(lines.append)
    time.sleep(0.01)
alive = child.poll()
child.send_signal(signal.SIGTERM)
child.wait(20)
while child.pump_stderr(lines.append):
    time.sleep(0.01)
child.close_stderr()
print(json.dumps({"lines": lines, "alive": alive, "returncode": child.returncode}))
"""


def test_the_next_image_adopts_the_child_across_exec(tmp_path: Path) -> None:
    script = tmp_path / "start.sh"
    script.write_text(
        '#!/bin/sh\necho "epoch $RESTART_EPOCH" >&2\n'
        "trap 'echo bye >&2; exit 7' TERM\necho ready >&2\nwhile :; do sleep 0.05; done\n"
    )
    script.chmod(0o755)
    result = subprocess.run(
        [sys.executable, "-c", OLD_IMAGE, str(script), NEW_IMAGE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["lines"] == ["epoch 0", "ready", "bye"]
    assert report["alive"] is None
    assert report["returncode"] == 7
