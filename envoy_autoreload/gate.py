"""Running the gate's commands: one `Preflight` step at a time, in the loop's time.

`validation.py` decides what to run and what the results mean; this module only runs
each command as a child whose pipes sit in the reactor, reaps it by PID on SIGCHLD, and
kills it at its deadline, so a validator that hangs never stalls signals or the watcher.
What an outcome means for a restart is the supervisor's business.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path

from envoy_autoreload.command import CommandResult, RunningCommand
from envoy_autoreload.ports import Reactor
from envoy_autoreload.settings import Settings
from envoy_autoreload.validation import (
    BinaryInfo,
    Preflight,
    PreflightOutcome,
    run_preflight_now,
)


class CommandGate:
    """The real `Gate` of `ports.py`."""

    def __init__(self, settings: Settings, reactor: Reactor, deadline_key: Hashable) -> None:
        self._settings = settings
        self._reactor = reactor
        self._deadline_key = deadline_key
        self._preflight: Preflight | None = None
        self._command: RunningCommand | None = None

    @property
    def enabled(self) -> bool:
        """A gate needs a binary, and something to check: a config to validate or a
        watched binary to vet."""
        settings = self._settings
        return settings.envoy is not None and (
            (settings.validate and settings.config is not None)
            or (settings.watch_binary and bool(settings.watch))
        )

    @property
    def busy(self) -> bool:
        return self._preflight is not None

    def _new_preflight(
        self, known_binary: BinaryInfo | None, config: Path | None, flags: Sequence[str]
    ) -> Preflight:
        """`config` is the snapshot to validate (or --config itself without generations)."""
        assert self._settings.envoy is not None
        return Preflight(
            self._settings.envoy,
            (config or self._settings.config) if self._settings.validate else None,
            known_binary=known_binary,
            timeout_s=self._settings.validate_timeout_s,
            flags=flags,
        )

    def check_now(self, config: Path | None, flags: Sequence[str] = ()) -> PreflightOutcome:
        """Blocking, for start-up, before the loop runs."""
        return run_preflight_now(self._new_preflight(None, config, flags))

    def begin(
        self, known_binary: BinaryInfo | None, config: Path | None, flags: Sequence[str] = ()
    ) -> PreflightOutcome | None:
        """Start checking; the outcome comes from `poll()`, or now if nothing had to run."""
        assert self._preflight is None
        self._preflight = self._new_preflight(known_binary, config, flags)
        return self._next_step()

    def child_pids(self) -> set[int]:
        return {self._command.pid} if self._command is not None else set()

    def owns(self, key: Hashable) -> bool:
        """Whether an fd event's key is one of our command's pipes."""
        return key is not None and key is self._command

    def on_output(self, key: Hashable) -> None:
        command = self._command
        if command is None or key is not command:
            return
        for fd in command.open_fds():
            if not command.pump(fd):
                self._reactor.remove_reader(fd)

    def on_deadline(self) -> None:
        if self._command is not None:
            self._command.kill()  # reaped on SIGCHLD; its result says it timed out

    def poll(self) -> PreflightOutcome | None:
        """On SIGCHLD: feed a finished command to the preflight; the outcome once done."""
        command = self._command
        if command is None:
            return None
        result = command.result()
        if result is None:
            return None
        self._drop(command)
        assert self._preflight is not None
        self._preflight.feed(result)
        return self._next_step()

    def abandon(self) -> None:
        """On shutdown: kill and reap the running command, forget the preflight."""
        command = self._command
        if command is not None:
            self._drop(command)
            command.abandon()
        self._preflight = None

    def _next_step(self) -> PreflightOutcome | None:
        preflight = self._preflight
        assert preflight is not None
        while (argv := preflight.next_argv()) is not None:
            try:
                command = RunningCommand(argv, preflight.timeout_s)
            except OSError as err:
                preflight.feed(CommandResult(tuple(argv), 127, "", str(err), 0.0))
                continue
            self._command = command
            for fd in command.open_fds():
                self._reactor.add_reader(fd, command)
            self._reactor.set_deadline(self._deadline_key, command.deadline)
            return None
        self._preflight = None
        return preflight.outcome

    def _drop(self, command: RunningCommand) -> None:
        for fd in command.all_fds():
            self._reactor.remove_reader(fd)
        self._reactor.cancel(self._deadline_key)
        command.close()
        self._command = None
