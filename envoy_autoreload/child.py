"""The start script run as a real process: spawn, signal, kill, reap and read its stderr.

A generation is spawned from the main thread only: Envoy sets PR_SET_PDEATHSIG to
SIGTERM, and Linux ties that to the *thread* that forked it, so a child spawned from a
worker thread is killed when that thread ends (ENVOY_FACTS §11). The start script is
exec'd without a shell, with `RESTART_EPOCH` added to a copy of our environment; our
own `os.environ` is never touched (upstream's restarter mutates it).

Each child gets its own process group (`process_group=0`): a Ctrl-C in a terminal then
reaches only the daemon, which stops the children in order. Signals go through
`Popen.send_signal`, which polls first so a reused PID is never hit (bpo-38630).
Reaping is `Popen.poll()` on this PID only, never `waitpid(-1)`: that would steal the
exit status of other children (a validator would then read as success).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

from envoy_autoreload.envoy_process import EnvoyProcess, executable_of
from envoy_autoreload.logs import write_stderr

SNAPSHOT_VARIABLE: Final = "ENVOY_AUTORELOAD_SNAPSHOT"
STDERR_TAIL_LINES: Final = 12
# Output without a newline is kept up to this much, then passed on as a line: a child
# that writes megabytes without a newline must not grow the daemon (REVIEW-core 14).
MAX_PARTIAL_LINE: Final = 64 * 1024


class ScriptChild:
    """One run of the start script: the real `ChildProcess` of `ports.py`."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._partial_line = b""

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def poll(self) -> int | None:
        """Reap this PID if it exited; never touches any other child."""
        return self.process.poll()

    def send_signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    def signal_envoy(self, signum: signal.Signals, envoy: EnvoyProcess | None) -> None:
        """Signal Envoy itself: the child, or the Envoy under a start script that did not
        exec (a shell dies of SIGUSR1, and its Envoy with it through PDEATHSIG, §11)."""
        if envoy is not None and envoy.pid != self.pid and self.poll() is None:
            exe = executable_of(envoy.pid)
            if exe is not None and exe == envoy.exe:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(envoy.pid, signum)
            # Never the shell instead: SIGUSR1 would kill it, and Envoy with it
            # (REVIEW-core finding 4).
            return
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL the child's process group (its own, from `process_group=0`), so an Envoy
        left under a start script that did not exec dies too. Only while unreaped: until
        then the group id cannot be reused."""
        if self.process.returncode is not None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            self.process.kill()

    def wait(self, timeout_s: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout_s)

    def stderr_fd(self) -> int | None:
        stream = self.process.stderr
        return stream.fileno() if stream is not None and not stream.closed else None

    def pump_stderr(self, on_line: Callable[[str], None] | None = None) -> bool:
        """Pass on what the child wrote and keep its last lines; False at EOF.

        Without `on_line` the bytes go to our stderr unchanged (upstream's behaviour:
        Envoy's log reaches the same journal); with it, each complete line is handed over
        (the JSON log wraps it in an event). The tail lets a failure be logged with its
        cause either way.
        """
        fd = self.stderr_fd()
        if fd is None:
            return False
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return True
            except OSError as err:
                if err.errno == errno.EINTR:
                    continue
                chunk = b""
            if not chunk:
                last = self._flush_partial()
                if last is not None and on_line is not None:
                    on_line(last)
                return False
            if on_line is None:
                write_stderr(chunk)  # through the relay: never blocks the loop
            self._split_lines(chunk, on_line)

    def _split_lines(self, chunk: bytes, on_line: Callable[[str], None] | None) -> None:
        lines = (self._partial_line + chunk).split(b"\n")
        self._partial_line = lines.pop()
        if len(self._partial_line) > MAX_PARTIAL_LINE:
            lines.append(self._partial_line)
            self._partial_line = b""
        for raw in lines:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.stderr_tail.append(line)
                if on_line is not None:
                    on_line(line)

    def close_stderr(self) -> None:
        if self.process.stderr is not None:
            self.process.stderr.close()

    def _flush_partial(self) -> str | None:
        line = self._partial_line.decode(errors="replace").rstrip()
        self._partial_line = b""
        if not line:
            return None
        self.stderr_tail.append(line)
        return line

    def last_error_line(self) -> str | None:
        return self.stderr_tail[-1] if self.stderr_tail else None


PR_SET_PDEATHSIG: Final = 1


def _dies_with_the_daemon() -> Callable[[], None] | None:
    """Run in the child between fork and exec: ask for SIGTERM when the daemon dies.

    Envoy asks for this itself (ENVOY_FACTS §11), but only once it runs: a start script
    that does work before `exec envoy`, or forgets `exec`, would otherwise outlive a
    SIGKILLed daemon and start (or keep) an Envoy nobody supervises, holding the ports.
    The request survives exec. Checking the parent afterwards closes the race with a
    daemon that died before the request was made. Linux only; elsewhere, nothing.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child
    daemon_pid = os.getpid()

    def request() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != daemon_pid:
            os._exit(1)

    return request


def reap_strays(ours: set[int]) -> None:
    """Reap exited children that are not ours, when we are PID 1.

    Peeks first (`WNOWAIT`): a child of ours that exited since its own poll keeps its
    status for `Popen.poll()`, which would otherwise read ECHILD as exit status 0.
    Anywhere but PID 1 there are no strays and nothing is done.
    """
    if os.getpid() != 1:
        return
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid in ours:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, os.WNOHANG)


class ScriptSpawner:
    """Runs the start script; the real `Processes` of `ports.py`."""

    def __init__(self, start_script: Path, script_args: tuple[str, ...]) -> None:
        self._start_script = start_script
        self._script_args = script_args

    def reap_strays(self, ours: set[int]) -> None:
        reap_strays(ours)

    def spawn(self, epoch: int, snapshot: Path | None = None) -> ScriptChild:
        """Exec the start script directly with RESTART_EPOCH and the config snapshot it is
        to start (ENVOY_AUTORELOAD_SNAPSHOT, never set in our own environment); raises
        OSError if exec fails."""
        env = {**os.environ, "RESTART_EPOCH": str(epoch)}
        env.pop(SNAPSHOT_VARIABLE, None)  # one an outer supervisor gave us is not ours
        if snapshot is not None:
            env[SNAPSHOT_VARIABLE] = str(snapshot)
        # preexec_fn is unsafe in a threaded process only when it takes a lock another
        # thread may hold; this one makes two system calls (the status thread holds
        # nothing of them).
        process = subprocess.Popen(
            [str(self._start_script), *self._script_args],
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            process_group=0,
            close_fds=True,
            preexec_fn=_dies_with_the_daemon(),
        )
        assert process.stderr is not None
        os.set_blocking(process.stderr.fileno(), False)
        return ScriptChild(process)
