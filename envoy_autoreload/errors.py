"""Errors a user can cause, and the exit codes the daemon ends with.

Only `cli.py` turns an `AutoreloadError` into a message and an exit code; anything
else that escapes is a bug and keeps its traceback. `str(err)` is one line: what,
where, and the fix when there is one.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """The daemon's exit status. 0 and 1 keep upstream hot-restarter.py's contract."""

    CLEAN_STOP = 0
    """Every child exited within --term-wait after SIGTERM/SIGINT."""
    CHILD_KILLED = 1
    """A child had to be SIGKILLed at shutdown, or the crash budget ran out."""
    USAGE = 2
    """Bad command line (click's own usage errors use 2 as well)."""
    STARTUP_FAILURE = 3
    """The daemon could not start supervising (nothing was left running)."""


class AutoreloadError(Exception):
    """A mistake in the user's input or environment, reported as one line."""

    exit_code: ExitCode = ExitCode.STARTUP_FAILURE


class UsageError(AutoreloadError):
    """A bad option value or a missing path named on the command line."""

    exit_code = ExitCode.USAGE


class StartScriptError(UsageError):
    """START_SCRIPT is missing, not a file, or not executable."""


class ConfigError(AutoreloadError):
    """The Envoy config cannot be read or parsed well enough to find what we need."""


class SpawnError(AutoreloadError):
    """The start script could not be executed at all (exec failed)."""


class WatchLimitError(AutoreloadError):
    """inotify ran out of watches (ENOSPC) or instances (EMFILE); the text has the fix."""


class BinaryError(UsageError):
    """--envoy does not name an Envoy binary (missing, not executable, not Envoy)."""


class ValidationFailed(AutoreloadError):
    """The config fails `envoy --mode validate` at start-up: Envoy is not started."""
