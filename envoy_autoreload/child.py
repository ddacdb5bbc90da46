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

After a re-exec in place (same PID) the new image has no `Popen` for the children it
inherited, only their PIDs and the read ends of their stderr pipes: `AdoptedChild` is
the same `ChildProcess` built on those, with a pidfd taken at adoption where the kernel
has one, so no signal can reach a process that merely reused the PID.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import ctypes
import errno
import math
import os
import select
import signal
import stat
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Final, cast

from envoy_autoreload.envoy_process import EnvoyProcess, executable_of, live_group_members
from envoy_autoreload.logs import write_stderr
from envoy_autoreload.standby import Standby, environment_survives, make_standby
from envoy_autoreload.standby import reap as standby_reap

SNAPSHOT_VARIABLE: Final = "ENVOY_AUTORELOAD_SNAPSHOT"
STDERR_TAIL_LINES: Final = 12
# Output without a newline is kept up to this much, then passed on as a line: a child
# that writes megabytes without a newline must not grow the daemon (REVIEW-core 14).
MAX_PARTIAL_LINE: Final = 64 * 1024
# The returncode of an adopted child that was reaped by someone else (ECHILD): its exit
# status is lost. Never 0 (Popen's choice), so a vanished child never reads as a clean
# exit; a positive "exit status 255" rather than an invented signal.
LOST_EXIT_STATUS: Final = 255
WAIT_STEP_S: Final = 0.05  # longest sleep between polls when no pidfd can be waited on
FIRST_DISCARD_WAIT_S: Final = 1.0  # an epoch 0 SIGKILLed before another is spawned
GROUP_POLL_S: Final = 0.01  # how often a group on its way out is looked at


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class _OwnedFd:
    """A descriptor closed exactly once: by `close()`, or when collected (as the file
    object Popen makes would be), unless `release()`d for the next image of the daemon,
    after which only an explicit `close()` closes it."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd
        self._on_collect = weakref.finalize(self, _close_quietly, fd)

    def release(self) -> None:
        self._on_collect.detach()

    def close(self) -> None:
        fd, self.fd = self.fd, None
        self._on_collect.detach()
        if fd is not None:
            os.close(fd)


class _Child(abc.ABC):
    """What `ScriptChild` and `AdoptedChild` share: reading the child's stderr pipe
    (passed on, split into lines, the last ones kept) and signalling Envoy itself."""

    def __init__(self, stderr_fd: int | None) -> None:
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._partial_line = b""
        self._stderr = _OwnedFd(stderr_fd) if stderr_fd is not None else None

    @property
    @abc.abstractmethod
    def pid(self) -> int: ...

    @abc.abstractmethod
    def poll(self) -> int | None: ...

    @abc.abstractmethod
    def send_signal(self, signum: signal.Signals) -> None: ...

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
        self.send_signal(signum)

    @abc.abstractmethod
    def kill(self, signum: signal.Signals = signal.SIGKILL) -> None: ...

    @abc.abstractmethod
    def wait(self, timeout_s: float) -> None: ...

    def finish_group(self, grace_s: float) -> None:
        """After a SIGTERM to the group, on the way out: wait up to `grace_s` for all of
        it to go, SIGKILL what is left (a helper the start script left in the background
        that ignores SIGTERM would otherwise outlive the daemon), then reap the leader.
        Reaped last on purpose: until then its PID, the group's id, cannot become
        another group's, so the SIGKILL reaches only this one."""
        deadline = time.monotonic() + grace_s
        while live_group_members(self.pid) and time.monotonic() < deadline:
            time.sleep(GROUP_POLL_S)
        if live_group_members(self.pid):
            self.kill()
        self.wait(grace_s)

    def stderr_fd(self) -> int | None:
        return self._stderr.fd if self._stderr is not None else None

    def inheritable_stderr_fd(self) -> int | None:
        """The read end of the child's stderr pipe for the next image of the daemon
        (`execv`, same PID): close-on-exec cleared, the same number, still open.

        Nothing closes it behind the caller's back from now on: no file object owns it
        (the pipe is ours, not Popen's, so Popen never holds it) and the close on
        garbage collection is withdrawn; `execv` runs no finalizer anyway. This object
        still reads it until the exec, so a failed exec changes nothing, and
        `close_stderr()` still closes it. None once closed.
        """
        if self._stderr is None or self._stderr.fd is None:
            return None
        os.set_inheritable(self._stderr.fd, True)
        self._stderr.release()
        return self._stderr.fd

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
        if self._stderr is not None:
            self._stderr.close()

    def _flush_partial(self) -> str | None:
        line = self._partial_line.decode(errors="replace").rstrip()
        self._partial_line = b""
        if not line:
            return None
        self.stderr_tail.append(line)
        return line

    def last_error_line(self) -> str | None:
        return self.stderr_tail[-1] if self.stderr_tail else None


class ScriptChild(_Child):
    """One run of the start script: the real `ChildProcess` of `ports.py`.

    `stderr_fd` is the read end of its stderr pipe, made by `ScriptSpawner.spawn` and
    owned here (not by `process`, whose `stderr` is None)."""

    def __init__(self, process: subprocess.Popen[bytes], stderr_fd: int | None) -> None:
        super().__init__(stderr_fd)
        self.process = process
        self._spawned_at = time.monotonic()  # the real reactor's clock

    @property
    def spawned_at(self) -> float | None:
        return self._spawned_at

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

    def kill(self, signum: signal.Signals = signal.SIGKILL) -> None:
        """SIGKILL (or `signum`) the child's process group (its own, from
        `process_group=0`), so an Envoy left under a start script that did not exec gets
        it too. Only while unreaped: until then the group id cannot be reused."""
        if self.process.returncode is not None:
            return
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            self.process.send_signal(signum)

    def wait(self, timeout_s: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout_s)


def _open_pidfd(pid: int) -> int | None:
    """A pidfd for `pid` (Linux 5.3+), or None where there is none (then signals go by
    PID, guarded by polling first as Popen does)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _adopted_pipe(fd: int) -> None:
    """Check an inherited stderr fd is a pipe, and make it ours: close-on-exec again (it
    is handed over explicitly, never leaked into an exec) and non-blocking. Raises
    OSError if it is not open or not a pipe."""
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        raise OSError(errno.EINVAL, f"inherited stderr fd {fd} is not a pipe")
    os.set_inheritable(fd, False)
    os.set_blocking(fd, False)


class AdoptedChild(_Child):
    """A child this process inherited across its own re-exec: the `ChildProcess` of
    `ports.py` from a PID and the read end of its stderr pipe, behaving as `ScriptChild`.

    Reaping is `waitpid(pid, WNOHANG)` on this PID only; the status maps as Popen maps it
    (exit code, or -signum). A PID that is not (or no longer) our child, because someone
    else reaped it, reads as exited with `LOST_EXIT_STATUS` and `exit_status_lost` set:
    it is never signalled again. Signals go through a pidfd taken at adoption when the
    kernel has one (race-free: a reaped process cannot be confused with a new one),
    else by PID after a poll, as Popen does (bpo-38630).
    """

    def __init__(self, pid: int, stderr_fd: int | None) -> None:
        if stderr_fd is not None:
            _adopted_pipe(stderr_fd)
        super().__init__(stderr_fd)
        self._pid = pid
        self._returncode: int | None = None
        self.exit_status_lost = False
        self._pidfd: _OwnedFd | None = None
        if self._still_ours():
            pidfd = _open_pidfd(pid)
            self._pidfd = _OwnedFd(pidfd) if pidfd is not None else None

    @property
    def spawned_at(self) -> float | None:
        return None  # by the previous image; the handover carries the generation's time

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def poll(self) -> int | None:
        """Reap this PID if it exited; never touches any other child."""
        if self._returncode is not None:
            return self._returncode
        try:
            pid, status = os.waitpid(self._pid, os.WNOHANG)
        except ChildProcessError:
            self._lost()
            return self._returncode
        if pid == 0:
            return None
        self._reaped(os.waitstatus_to_exitcode(status))
        return self._returncode

    def send_signal(self, signum: signal.Signals) -> None:
        """Signal the child unless it was reaped: its PID may be another process's now."""
        if self.poll() is not None:
            return
        pidfd = self._pidfd.fd if self._pidfd is not None else None
        with contextlib.suppress(ProcessLookupError):
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signum)
            else:
                os.kill(self._pid, signum)

    def kill(self, signum: signal.Signals = signal.SIGKILL) -> None:
        """SIGKILL (or `signum`) the child's process group, as `ScriptChild.kill`: only
        while unreaped (an exited leader is not reaped first, so the rest of its group
        still gets it)."""
        if self._returncode is not None or not self._still_ours():
            return
        try:
            os.killpg(self._pid, signum)
        except (ProcessLookupError, PermissionError):
            self.send_signal(signum)

    def wait(self, timeout_s: float) -> None:
        """Reap the child if it exits within `timeout_s`; returns by then either way."""
        deadline = time.monotonic() + timeout_s
        step = 0.005
        while self.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            pidfd = self._pidfd.fd if self._pidfd is not None else None
            if pidfd is not None:  # readable once the process has exited
                poller = select.poll()
                poller.register(pidfd, select.POLLIN)
                poller.poll(math.ceil(left * 1000))
            else:
                time.sleep(min(step, left))
                step = min(step * 2, WAIT_STEP_S)

    def _still_ours(self) -> bool:
        """Whether the PID is still our unreaped child (alive or a zombie), without
        reaping it; marks it lost if not. Where `waitid` is missing, assumed."""
        if not hasattr(os, "waitid"):
            return True
        try:
            os.waitid(os.P_PID, self._pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            self._lost()
            return False
        return True

    def _lost(self) -> None:
        self.exit_status_lost = True
        self._reaped(LOST_EXIT_STATUS)

    def _reaped(self, returncode: int) -> None:
        self._returncode = returncode
        if self._pidfd is not None:
            self._pidfd.close()
            self._pidfd = None


PR_SET_PDEATHSIG: Final = 1


def _dies_with_the_daemon() -> Callable[[], None] | None:
    """Run in the child between fork and exec: ask for SIGTERM when the daemon dies.

    Envoy asks for this itself (ENVOY_FACTS §11), but only once it runs: a start script
    that does work before `exec envoy`, or forgets `exec`, would otherwise outlive a
    SIGKILLed daemon and start (or keep) an Envoy nobody supervises, holding the ports.
    The request survives exec. Checking the parent afterwards closes the race with a
    daemon that died before the request was made. Linux only; elsewhere, nothing.

    The child also starts with no signal blocked: epoch 0 may be spawned while the
    daemon holds its own signals back for the loop (`head_start.py`), and a mask
    survives exec too; an Envoy that never received SIGTERM could not be stopped.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child
    daemon_pid = os.getpid()

    def request() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
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


SETPRIV_PATHS: Final = ("/usr/bin/setpriv", "/bin/setpriv")


def _file_identity(path: Path) -> tuple[int, ...] | None:
    """What says the start script is the file that was exec'd before: a replaced,
    rewritten, chmod'ed or deleted script differs (None when it cannot be stat'ed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mode, st.st_mtime_ns, st.st_ctime_ns)


def _find_setpriv() -> str | None:
    """util-linux's `setpriv`, by absolute path (never through PATH: the daemon may run
    as root), if it knows `--pdeathsig` (2.33 and later; busybox's does not)."""
    if not sys.platform.startswith("linux"):
        return None
    for path in SETPRIV_PATHS:
        if not os.access(path, os.X_OK):
            continue
        try:
            done = subprocess.run([path, "--help"], capture_output=True, timeout=5, check=False)
        except (OSError, subprocess.SubprocessError):
            continue
        if b"--pdeathsig" in done.stdout + done.stderr:
            return path
    return None


def _popen(argv: list[str], env: dict[str, str], preexec: Callable[[], None] | None) -> ScriptChild:
    """Popen with our stderr pipe. The pipe is ours, not Popen's (`stderr=PIPE` would
    wrap the read end in a file object that closes it whenever it is collected): a plain
    descriptor can be handed to the next image of the daemon (`inheritable_stderr_fd`).
    Both ends are close-on-exec; the child gets the write end as its fd 2 only."""
    read_end, write_end = os.pipe()
    try:
        # preexec_fn is unsafe in a threaded process only when it takes a lock another
        # thread may hold; ours makes two system calls (the status thread holds nothing
        # of them). Without one (None), CPython spawns by vfork.
        process = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=write_end,
            process_group=0,
            close_fds=True,
            preexec_fn=preexec,
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    os.set_blocking(read_end, False)
    return ScriptChild(process, read_end)


class CpuHandoff:
    """The CPU a fired standby was woken on, left to it for the rest of the turn.

    A pipe's reader is woken on the writer's CPU (a sync wakeup: the writer is expected
    to sleep), but the rest of the turn that fired it is ~1 ms of bookkeeping. With
    `sched_yield` the script went first (2.5 ms after the burst's deadline, not 3.2)
    and then shared the CPU with that bookkeeping: the PyPI launcher's 16 ms of Python
    lost ~1 ms to us (perf sched_switch, 2 cores; issue 16). A short sleep instead let
    the timer's wakeup put us back on the script's CPU whenever the other one was busy
    (the script's exec 2.1 ms after the deadline instead of 1.1). So, while a start
    fired ahead waits for those steps, the loop's thread moves itself off that CPU (its
    own affinity: every other CPU it may use); `restore` when the steps take it or
    drop it (`spawn`, `discard_fired` at the end of every event's steps, `release`) and
    before any spawn of ours, which would inherit the narrower set. Nothing else
    changes: the script, Envoy and our other threads keep theirs. One CPU only, or a
    kernel that refuses: nothing is done."""

    def __init__(self) -> None:
        self._saved: set[int] | None = None
        self._getcpu = _sched_getcpu()

    def leave(self) -> None:
        if self._saved is not None or self._getcpu is None:
            return
        try:
            allowed = os.sched_getaffinity(0)
            here = self._getcpu()
            others = allowed - {here}
            if here not in allowed or not others:
                return
            os.sched_setaffinity(0, others)
        except OSError:
            return
        self._saved = allowed

    def restore(self) -> None:
        saved, self._saved = self._saved, None
        if saved is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, saved)


def _sched_getcpu() -> Callable[[], int] | None:
    """glibc's `sched_getcpu` (the CPU this thread runs on); None off Linux."""
    if not sys.platform.startswith("linux") or not hasattr(os, "sched_setaffinity"):
        return None
    try:
        getcpu = ctypes.CDLL(None, use_errno=True).sched_getcpu
    except (OSError, AttributeError):
        return None
    getcpu.restype = ctypes.c_int
    getcpu.argtypes = []
    return cast(Callable[[], int], getcpu)


class ScriptSpawner:
    """Runs the start script; the real `Processes` of `ports.py`.

    A spawn is on every restart's critical path, so it takes the cheap way once that is
    safe. A `preexec_fn` (our PR_SET_PDEATHSIG request) makes CPython fork the whole
    daemon and run Python in the child: 1.6-2.4 ms until the script is exec'd (measured,
    2 cores; bench/README.md). Without one, CPython spawns by vfork in ~0.1 ms, and
    util-linux's `setpriv --pdeathsig TERM`, exec'd in between (~0.8 ms), makes the
    same request, which survives its exec of the script.

    That way is taken only for a script file (inode, size, mode, times) that was exec'd
    the exact way before: an exec failure would otherwise be `setpriv`'s exit status
    126/127 rather than the OSError that makes a first start a one-line error and a
    later one `restart.failed` with `cause=exec failed`. What it gives up: the check of
    the parent after the request (`_dies_with_the_daemon`), so a daemon SIGKILLed in
    the ~1 ms between the vfork and `setpriv`'s request leaves that script, and the
    Envoy it starts, orphaned. Without `setpriv`, and off Linux, every spawn takes the
    exact way.

    Cheapest of all is a standby (standby.py): made the exact way at a quiet moment
    (`prepare`, once a generation is LIVE), for the same proven file, it turns the next
    spawn into one write. The same file rule holds when it is used.
    """

    def __init__(self, start_script: Path, script_args: tuple[str, ...]) -> None:
        self._start_script = start_script
        self._script_args = script_args
        self._setpriv: str | None = None
        self._setpriv_looked_for = False
        self._proven: tuple[int, ...] | None = None  # the file last exec'd the exact way
        self._standby: Standby | None = None
        self._dropped: list[subprocess.Popen[bytes]] = []  # standbys let go, not reaped yet
        self._env_survives: bool | None = None  # through the standby's shell; None: not known
        # (epoch, snapshot, child) fired ahead (`ready_start.py`), until `spawn` takes it.
        self._fired: tuple[int, Path | None, ScriptChild] | None = None
        self._discarded: int | None = None  # a fired child killed, not yet reported
        self._cpu = CpuHandoff()

    def reap_strays(self, ours: set[int]) -> None:
        if self._standby is not None and self._standby.process.poll() is not None:
            self._drop_standby()  # it died by itself: reaped now, or as PID 1 it would
            # stop `reap_strays` at its zombie, ours, and strays would pile up behind it
        self._dropped = [p for p in self._dropped if p.poll() is None]
        waiting = [self._standby.process] if self._standby is not None else []
        reap_strays(ours | {p.pid for p in [*self._dropped, *waiting]})

    def _argv(self) -> tuple[str, ...]:
        return (str(self._start_script), *self._script_args)

    @staticmethod
    def _environment() -> dict[str, str]:
        """Ours, less a snapshot an outer supervisor gave us (it is not ours)."""
        env = dict(os.environ)
        env.pop(SNAPSHOT_VARIABLE, None)
        return env

    def prepare(self) -> None:
        """At a quiet moment: a standby for the next spawn (standby.py), if the script is
        the file last exec'd the exact way and our environment survives the shell.
        Never raises: without one, the next spawn takes the usual way."""
        self._cpu.restore()  # make_standby spawns
        identity = _file_identity(self._start_script)
        if self._standby_is_for(identity):
            return
        self._drop_standby()
        if identity is None or identity != self._proven or not sys.platform.startswith("linux"):
            return
        env = self._environment()
        if self._env_survives is None:
            self._env_survives = environment_survives(env, SNAPSHOT_VARIABLE)
        if not self._env_survives:
            return
        try:
            self._standby = make_standby(
                self._argv(), env, identity, SNAPSHOT_VARIABLE, _dies_with_the_daemon()
            )
        except (OSError, subprocess.SubprocessError):  # no fork, or the child's request failed
            self._standby = None

    @property
    def standby_pid(self) -> int | None:
        """The PID the next spawn will have if it takes the standby (None: none is ready)."""
        return self._standby.process.pid if self._standby is not None else None

    def _standby_is_for(self, identity: tuple[int, ...] | None) -> bool:
        standby = self._standby
        return (
            standby is not None
            and standby.process.poll() is None
            and standby.identity == identity
            and standby.argv == self._argv()
        )

    def release(self) -> None:
        """Before a re-exec and on the way out: no standby left behind, all reaped."""
        self._cpu.restore()
        if self._fired is not None:
            self._discard(self._fired[2])
        self._drop_standby()
        for process in self._dropped:
            standby_reap(process)
        self._dropped = []

    def _drop_standby(self) -> None:
        standby, self._standby = self._standby, None
        if standby is not None:
            standby.drop()
            self._dropped.append(standby.process)

    def _from_standby(
        self, identity: tuple[int, ...] | None, epoch: int, snapshot: Path | None
    ) -> ScriptChild | None:
        """The spawn by the standby, when it is for this very file and still there."""
        standby, self._standby = self._standby, None
        if standby is None:
            return None
        current = identity is not None and identity == self._proven == standby.identity
        path = str(snapshot) if snapshot is not None else None
        if current and standby.argv == self._argv() and standby.fire(epoch, path):
            return ScriptChild(standby.process, standby.stderr_fd)
        standby.drop()
        self._dropped.append(standby.process)
        return None

    def fire_ahead(self, epoch: int, snapshot: Path | None) -> bool:
        """Only by the standby: one write. Anything slower is not worth starting before
        the decision (`ready_start.py`)."""
        if self._fired is not None:
            return False
        child = self._from_standby(_file_identity(self._start_script), epoch, snapshot)
        if child is None:
            return False
        # The steps that decide the start follow in this turn (`ready_start.py`): the
        # script keeps the CPU it was woken on until they end (CpuHandoff).
        self._cpu.leave()
        self._fired = (epoch, snapshot, child)
        return True

    def fire_first(self, snapshot: Path | None) -> bool:
        """Epoch 0 at start-up, once its config validated and before the rest of the
        daemon is imported (`head_start.py`, issue 16: 0.06-0.1 s that Envoy no longer
        waits for); the supervisor's `spawn(0, snapshot)` takes it. False: the script
        could not be executed, and that spawn says why."""
        assert self._fired is None
        try:
            self._fired = (0, snapshot, self.spawn(0, snapshot))
        except OSError:
            return False
        return True

    def started_ahead(self, epoch: int) -> bool:
        return self._fired is not None and self._fired[0] == epoch

    def discard_fired(self) -> int | None:
        self._cpu.restore()  # the end of the steps that took (or did not take) it
        if self._fired is not None:
            self._discard(self._fired[2])
        pid, self._discarded = self._discarded, None
        return pid

    def _discard(self, child: ScriptChild) -> None:
        """Killed with its group within the turn that fired it, long before it could
        reach its parent (Envoy's start takes ~50 ms, ENVOY_FACTS §2); a flag it set
        anyway is cleared before the next start (§3). Reaped on SIGCHLD. An epoch 0 has
        no parent but holds the family's sockets until it is gone: the epoch 0 started
        instead could not bind them (§0), so it is waited for (SIGKILL: milliseconds)."""
        epoch = self._fired[0] if self._fired is not None else None
        self._fired = None
        child.kill()
        child.close_stderr()
        if epoch == 0:
            child.wait(FIRST_DISCARD_WAIT_S)
        self._dropped.append(child.process)
        self._discarded = child.pid

    def spawn(self, epoch: int, snapshot: Path | None = None) -> ScriptChild:
        """Exec the start script directly with RESTART_EPOCH and the config snapshot it is
        to start (ENVOY_AUTORELOAD_SNAPSHOT, never set in our own environment); raises
        OSError if exec fails. The child fired ahead, if it is exactly this start."""
        self._cpu.restore()  # no child of ours inherits the narrower set
        fired = self._fired
        if fired is not None and fired[:2] == (epoch, snapshot):
            self._fired = None
            return fired[2]
        if fired is not None:
            self._discard(fired[2])  # not the start decided
        identity = _file_identity(self._start_script)
        ready = self._from_standby(identity, epoch, snapshot)
        if ready is not None:
            # The script goes first: it was woken on our CPU (see CpuHandoff), and
            # what is left of the turn after a spawn is short.
            os.sched_yield()
            return ready
        env = {**self._environment(), "RESTART_EPOCH": str(epoch)}
        if snapshot is not None:
            env[SNAPSHOT_VARIABLE] = str(snapshot)
        argv = list(self._argv())
        setpriv = self._setpriv
        if setpriv is not None and identity is not None and identity == self._proven:
            return _popen([setpriv, "--pdeathsig", "TERM", "--", *argv], env, None)
        child = _popen(argv, env, _dies_with_the_daemon())
        self._proven = identity  # exec'd: the next spawn of this very file may be fast
        if not self._setpriv_looked_for:
            self._setpriv_looked_for = True
            self._setpriv = _find_setpriv()  # after the spawn: off its critical path
        return child

    def adopt(self, pid: int, stderr_fd: int | None) -> AdoptedChild:
        """A child the previous image of this process spawned, by PID and the read end of
        its stderr pipe (`ScriptChild.inheritable_stderr_fd` there); raises OSError if
        `stderr_fd` is not an open pipe. A PID that is not our child reads as exited
        (`AdoptedChild.exit_status_lost`) and is never signalled."""
        return AdoptedChild(pid, stderr_fd)
