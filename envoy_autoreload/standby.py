"""The start script's process, forked before the restart that needs it.

A spawn is on every restart's critical path. Through `subprocess` it is a vfork, an exec
of `setpriv` (PR_SET_PDEATHSIG, child.py) and then the script: about 1.7 ms from the
decision to the script running on 2 cores. Upstream's restarter takes 2.0 ms from SIGHUP
to its script's exec (perf `sched_process_exec`; issue 16, bench/README.md). A standby
does that work ahead, at a quiet moment: `/bin/sh`, forked the exact way (PDEATHSIG asked
for and the parent checked, its own process group, the stderr pipe the script will
write), blocked reading its stdin. The spawn writes two lines, the epoch and the config
snapshot's path, and the shell execs the start script with them in its environment: one
`write` of the daemon's, and the script runs about 0.9 ms later.

What the script gets is what a direct spawn gives it: the same argv and PID, its own
process group, stdin /dev/null, our environment with RESTART_EPOCH and
ENVOY_AUTORELOAD_SNAPSHOT. The shell in between could change the environment (dash
drops names that are not shell identifiers and sets IFS and PWD), so
`environment_survives` checks it once, by the same route to `cat /proc/self/environ`;
where anything differs no standby is made.

A standby exits on EOF: when it is dropped, when the daemon re-execs (the write end is
close-on-exec) or dies (PDEATHSIG does too). Nothing here spawns from a thread other
than the caller's (ENVOY_FACTS §11): the caller is the loop.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

SHELL: Final = "/bin/sh"
# The shell's $0: what `ps` shows after its program and what its own errors start with.
NAME: Final = "envoy-autoreload-standby"
# The survey's $0 (`environment_survives`), so that neither `ps` nor a test takes the
# short-lived shell forked just before the first standby for the standby itself.
SURVEY_NAME: Final = "envoy-autoreload-survey"
CAT_PATHS: Final = ("/bin/cat", "/usr/bin/cat")
EPOCH_VARIABLE: Final = "RESTART_EPOCH"
SURVEY_TIMEOUT_S: Final = 5.0
REAP_WAIT_S: Final = 0.5


# What a POSIX shell sets on its own: put back as `env` has them (dash sets PWD to the
# working directory and exports a default IFS where `env` has one).
SHELL_SETS: Final = ("PWD", "IFS")


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def shell_program(snapshot_variable: str, env: dict[str, str]) -> str:
    """Read the epoch and the snapshot path (an empty line: none), one line each, then
    exec the arguments; exit quietly on EOF (the daemon let go of it)."""
    restore = [
        f"{name}={_quoted(env[name])}; export {name}\n" if name in env else f"unset {name}\n"
        for name in SHELL_SETS
    ]
    return "".join(
        [
            f"IFS= read -r {EPOCH_VARIABLE} || exit 0\n",
            f"IFS= read -r {snapshot_variable} || exit 0\n",
            f"export {EPOCH_VARIABLE} {snapshot_variable}\n",
            f'[ -n "${snapshot_variable}" ] || unset {snapshot_variable}\n',
            *restore,
            'exec "$@" <>/dev/null\n',  # read-write, as subprocess.DEVNULL
        ]
    )


def _entries(env: dict[str, str]) -> list[bytes]:
    return sorted(os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items())


def environment_survives(env: dict[str, str], snapshot_variable: str) -> bool | None:
    """Whether a program exec'd through the standby's shell sees exactly `env` plus the
    epoch (`cat /proc/self/environ`, exec'd that way). False where it cannot be done;
    None where this attempt could not tell (no fork now, a timeout): ask again later."""
    cat = next((p for p in CAT_PATHS if os.access(p, os.X_OK)), None)
    if cat is None or not os.access(SHELL, os.X_OK):
        return False
    try:
        done = subprocess.run(
            [
                SHELL,
                "-c",
                shell_program(snapshot_variable, env),
                SURVEY_NAME,
                cat,
                "/proc/self/environ",
            ],
            input=b"0\n\n",
            env=env,
            capture_output=True,
            timeout=SURVEY_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    seen = sorted(entry for entry in done.stdout.split(b"\0") if entry)
    return done.returncode == 0 and seen == _entries({**env, EPOCH_VARIABLE: "0"})


@dataclass
class Standby:
    """A shell waiting to exec `argv`; `identity` is the script file's when made."""

    process: subprocess.Popen[bytes]
    stderr_fd: int  # the read end of the pipe that is the shell's (then the script's) fd 2
    command_fd: int | None  # the write end of the shell's stdin
    argv: tuple[str, ...]
    identity: tuple[int, ...]

    def fire(self, epoch: int, snapshot: str | None) -> bool:
        """Tell the shell to exec now. False, with nothing sent, when it cannot be told
        (it died, or the path cannot be one line): the caller spawns another way."""
        fd = self.command_fd
        if fd is None or self.process.poll() is not None or "\n" in (snapshot or ""):
            return False
        # The path as Popen's env= would pass it: fsencode, the locale's encoding.
        line = b"%d\n%s\n" % (epoch, os.fsencode(snapshot) if snapshot else b"")
        try:
            # One write under PIPE_BUF into an empty pipe: all of it, at once.
            written = os.write(fd, line)
        except OSError:
            return False
        finally:
            self._close_command()
        return written == len(line)

    def drop(self) -> None:
        """Let it go: EOF on its stdin, and it exits; the caller reaps it. Once only:
        the stderr fd's number may be another file's afterwards."""
        self._close_command()
        fd, self.stderr_fd = self.stderr_fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _close_command(self) -> None:
        fd, self.command_fd = self.command_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def make_standby(
    argv: tuple[str, ...],
    env: dict[str, str],
    identity: tuple[int, ...],
    snapshot_variable: str,
    preexec: Callable[[], None] | None,
) -> Standby:
    """Fork the shell (raises OSError if it cannot be). All our pipe ends are
    close-on-exec; the shell gets only the command pipe's read end (fd 0) and the
    stderr pipe's write end (fd 2)."""
    command_read, command_write = os.pipe()
    try:
        stderr_read, stderr_write = os.pipe()
    except OSError:
        os.close(command_read)
        os.close(command_write)
        raise
    try:
        process = subprocess.Popen(
            [SHELL, "-c", shell_program(snapshot_variable, env), NAME, *argv],
            env=env,
            stdin=command_read,
            stderr=stderr_write,
            process_group=0,
            close_fds=True,
            preexec_fn=preexec,
        )
    except BaseException:
        for fd in (command_write, stderr_read):
            os.close(fd)
        raise
    finally:
        os.close(command_read)
        os.close(stderr_write)
    os.set_blocking(stderr_read, False)
    return Standby(process, stderr_read, command_write, argv, identity)


def reap(process: subprocess.Popen[bytes], wait_s: float = REAP_WAIT_S) -> None:
    """Wait for a dropped standby (EOF makes it exit at once), SIGKILL it past `wait_s`."""
    try:
        process.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
