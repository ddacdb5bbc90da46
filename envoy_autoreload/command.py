"""A short-lived helper command (`envoy --mode validate`, `envoy --version`) run in the
event loop's time: its pipes sit in the selector, it is reaped by its own PID, and a
deadline kills it. Nothing waits for it, so signals and file events keep flowing while
Envoy validates a config.

Reaped with `Popen.poll()` on its PID only: a `waitpid(-1)` anywhere in the daemon would
steal its status, and subprocess would then report exit status 0 for a failed validation
(CPython `_try_wait` maps ECHILD to 0).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final

MAX_OUTPUT_BYTES: Final = 1 << 20


def describe_exit(returncode: int) -> str:
    """`exit status 1` or `killed by SIGKILL`, from a Popen returncode."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}"


@dataclass(frozen=True, slots=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int | None  # None: killed at its deadline
    stdout: str
    stderr: str
    duration_s: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    @property
    def output(self) -> str:
        return "\n".join(part for part in (self.stdout.rstrip(), self.stderr.rstrip()) if part)


class RunningCommand:
    """One helper process; the owner feeds it readable fds and SIGCHLD, and asks `result`."""

    def __init__(self, argv: list[str], timeout_s: float) -> None:
        self.argv = tuple(argv)
        self.timeout_s = timeout_s
        self.started_at = time.monotonic()
        self.deadline = self.started_at + timeout_s
        self._process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            process_group=0,
            close_fds=True,
        )
        assert self._process.stdout is not None and self._process.stderr is not None
        self._stdout_fd = self._process.stdout.fileno()
        self._stderr_fd = self._process.stderr.fileno()
        self._buffers = {self._stdout_fd: bytearray(), self._stderr_fd: bytearray()}
        for fd in self._buffers:
            os.set_blocking(fd, False)
        self._open = set(self._buffers)
        self._timed_out = False
        self._ended_at: float | None = None

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def finished(self) -> bool:
        """It has exited (and is reaped): a deadline no longer applies to it."""
        if self._ended_at is None and self._process.poll() is not None:
            self._ended_at = time.monotonic()  # or soon after: on its SIGCHLD
        return self._ended_at is not None

    @property
    def elapsed_s(self) -> float:
        """How long it has run: until its exit was seen, or until now."""
        ended = self._ended_at if self.finished else None
        return (ended or time.monotonic()) - self.started_at

    def open_fds(self) -> list[int]:
        return sorted(self._open)

    def all_fds(self) -> list[int]:
        """Both pipe fds, open or not: what the owner must unregister when done."""
        return [self._stdout_fd, self._stderr_fd]

    def pump(self, fd: int) -> bool:
        """Read what is there; False once this fd reached EOF (the caller unregisters it)."""
        buffer = self._buffers[fd]
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return True
            if not chunk:
                self._open.discard(fd)
                return False
            if len(buffer) < MAX_OUTPUT_BYTES:
                buffer.extend(chunk[: MAX_OUTPUT_BYTES - len(buffer)])

    def kill(self) -> None:
        """At the deadline: SIGKILL its process group (a wrapper script's children too)."""
        self._timed_out = True
        if self._process.returncode is None:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self._process.kill()

    def result(self) -> CommandResult | None:
        """The outcome once the process is reaped (its output is all read then); the owner
        unregisters `all_fds()` and calls `close()`."""
        if self._process.poll() is None:
            return None
        for fd in list(self._open):
            self.pump(fd)
        stdout = bytes(self._buffers[self._stdout_fd])
        stderr = bytes(self._buffers[self._stderr_fd])
        return CommandResult(
            argv=self.argv,
            returncode=None if self._timed_out else self._process.returncode,
            stdout=stdout.decode(errors="replace"),
            stderr=stderr.decode(errors="replace"),
            duration_s=time.monotonic() - self.started_at,
        )

    def finish_now(self) -> CommandResult:
        """Blocking, before the loop runs (start-up): read its pipes until both end,
        then reap it; killed at its deadline. Its pipes are read as it writes, so a
        long answer cannot fill one and leave it waiting for the deadline."""
        while self._open and (remaining := self.deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(sorted(self._open), [], [], remaining)
            for fd in ready:
                self.pump(fd)
        try:
            self._process.wait(max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            self._process.wait()
        result = self.result()
        assert result is not None  # reaped just now
        return result

    def close(self) -> None:
        self._open.clear()
        for stream in (self._process.stdout, self._process.stderr):
            if stream is not None and not stream.closed:
                stream.close()

    def abandon(self) -> None:
        """On shutdown: kill and reap now (a SIGKILLed process is reaped in moments)."""
        self.kill()
        self._process.wait()
        self.close()


def run_now(argv: list[str], timeout_s: float) -> CommandResult:
    """The same command, blocking: only for start-up checks, before the loop runs."""
    return run_all_now([argv], timeout_s)[0]


# Processes already running, by argv.
Running = dict[tuple[str, ...], subprocess.Popen[bytes]]


class CommandsAhead:
    """Commands started before their owner exists: the start-up check's, launched as
    soon as the command line is parsed, so that the daemon's own imports run while
    Envoy validates instead of before (issue 16). The owner later takes those it would
    run itself, for the same key (the binary's identity); the rest are killed."""

    def __init__(self, key: Hashable, argvs: list[list[str]]) -> None:
        self._key = key
        self.started_at = time.monotonic()
        self._running: dict[tuple[str, ...], subprocess.Popen[bytes]] = {}
        for argv in argvs:
            process = _launch(argv)
            if not isinstance(process, OSError):  # the owner's own launch says why
                self._running[tuple(argv)] = process

    def take(self, key: Hashable, argvs: list[list[str]]) -> Running:
        """What the owner would run, if it is for the same key; the rest is closed."""
        taken: Running = {}
        if key == self._key:
            for argv in map(tuple, argvs):
                process = self._running.pop(argv, None)
                if process is not None:
                    taken[argv] = process
        self.close()
        return taken

    def close(self) -> None:
        """Kill and reap what nobody took (its group: a wrapper's children too). Every
        group is killed before any is waited for."""
        running = list(self._running.values())
        for process in running:
            _kill_group(process)
        self._running.clear()
        for process in running:
            process.communicate()


def run_all_now(
    argvs: list[list[str]],
    timeout_s: float,
    ahead: Running | None = None,
) -> list[CommandResult]:
    """Several commands at once, blocking, each within `timeout_s` of the start: for
    start-up checks, where they are independent and the time is Envoy's first start's.
    A command whose pipe fills while an earlier one is read only waits. Those in
    `ahead` already run (`CommandsAhead`) and are not started again."""
    started = time.monotonic()
    deadline = started + timeout_s
    running = ahead or {}
    launched = [running.get(tuple(argv)) or _launch(argv) for argv in argvs]
    results = []
    for argv, process in zip(argvs, launched, strict=True):
        if isinstance(process, OSError):
            # Not executable by us (EACCES), gone, not a binary: the caller's verdict
            # says so in one line, as for the same failure in the loop.
            results.append(CommandResult(tuple(argv), 127, "", str(process), 0.0))
            continue
        results.append(_collect(argv, process, started, deadline))
    return results


def _launch(argv: list[str]) -> subprocess.Popen[bytes] | OSError:
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            process_group=0,
        )
    except OSError as err:
        return err


def _collect(
    argv: list[str], process: subprocess.Popen[bytes], started: float, deadline: float
) -> CommandResult:
    try:
        stdout, stderr = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill_group(process)
        stdout, stderr = process.communicate()
        return CommandResult(
            tuple(argv), None, _text(stdout), _text(stderr), time.monotonic() - started
        )
    return CommandResult(
        tuple(argv), process.returncode, _text(stdout), _text(stderr), time.monotonic() - started
    )


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Its own process group: a wrapper's children holding the pipes die with it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data
