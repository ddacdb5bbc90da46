"""Running the gate's commands: one `Preflight` step at a time, in the loop's time.

`validation.py` decides what to run and what the results mean; this module only runs
each command as a child whose pipes sit in the reactor, reaps it by PID on SIGCHLD, and
kills it at its deadline, so a validator that hangs never stalls signals or the watcher.
What an outcome means for a restart is the supervisor's business.

The gate also reads the config it validates (`bootstrap_facts.py`; a big one in a
child, while Envoy validates it), and a passing verdict is handed out once its facts
are in, so the supervisor can leave the files the config makes Envoy write out of the
digest before anything starts, without parsing a big config on the loop. A failing
verdict waits for nothing. The family's LIVE probe asks the same reader for a
generation's admin address.

A validation may also be started ahead (`check_ahead`, while a burst's debounce
waits; `check_ahead.py` decides when): `begin` takes it only if it would run exactly
that command, and kills it otherwise. The snapshot's path names its bytes and the
binary's path and flags are in the argv, so "the same argv" is "the same check"; a
binary that changed is checked the usual way (`--version` comes first). Whatever is
dropped is killed at once and reaped by its PID.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from pathlib import Path

from envoy_autoreload.bootstrap_facts import BootstrapFacts, BootstrapReader
from envoy_autoreload.command import CommandResult, RunningCommand
from envoy_autoreload.ports import Reactor
from envoy_autoreload.settings import Settings
from envoy_autoreload.validation import (
    BinaryInfo,
    Preflight,
    PreflightOutcome,
    first_check,
    preflight_for,
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
        self._outcome: PreflightOutcome | None = None  # a verdict waiting for its facts
        self._facts_of: Path | None = None  # the config the preflight checks
        self._ahead: RunningCommand | None = None  # a validation started before `begin`
        self._dropped: list[RunningCommand] = []  # killed, not reaped yet
        # Its parses share our deadline key: a config that is a FIFO must not hang one.
        self.bootstrap = BootstrapReader(reactor, self._arm_deadline)

    @property
    def enabled(self) -> bool:
        return self._settings.gated

    @property
    def busy(self) -> bool:
        return self._preflight is not None or self._outcome is not None

    def _new_preflight(
        self, known_binary: BinaryInfo | None, config: Path | None, flags: Sequence[str]
    ) -> Preflight:
        """`config` is the snapshot to validate (or --config itself without generations)."""
        return preflight_for(self._settings, known_binary, config, flags)

    def _config_of(self, config: Path | None) -> Path | None:
        return config or self._settings.config

    def check_now(self, config: Path | None, flags: Sequence[str] = ()) -> PreflightOutcome:
        """Blocking, for start-up, before the loop runs. The config is read meanwhile,
        for the first epoch's LIVE probe; the loop collects the facts."""
        path = self._config_of(config)
        if path is not None:
            self.bootstrap.request(path)
        return run_preflight_now(first_check(self._settings, config, flags))

    def begin(
        self, known_binary: BinaryInfo | None, config: Path | None, flags: Sequence[str] = ()
    ) -> PreflightOutcome | None:
        """Start checking, and reading the config; the outcome comes from `poll()`, or
        now if nothing had to run and its facts are known."""
        assert self._preflight is None and self._outcome is None
        self._preflight = self._new_preflight(known_binary, config, flags)
        self._facts_of = self._config_of(config)
        if self._facts_of is not None:
            self.bootstrap.request(self._facts_of)
        self._outcome = self._next_step()
        self.drop_ahead()  # not what this check runs
        self._arm_deadline()
        return self._release()

    def check_ahead(
        self, known_binary: BinaryInfo | None, config: Path | None, flags: Sequence[str] = ()
    ) -> bool:
        """Start the validation that `begin` with the same arguments would run, if that
        is all it would run; False when nothing was started."""
        if self.busy or self._ahead is not None:
            return False
        preflight = self._new_preflight(known_binary, config, flags)
        argvs = preflight.remaining_argvs()
        if len(argvs) != 1 or preflight.binary_changed:
            return False  # nothing to validate, or a binary to check first
        try:
            command = RunningCommand(argvs[0], preflight.timeout_s)
        except OSError:
            return False  # `begin` runs it, and says why it cannot
        self._listen(command)
        self._ahead = command
        self._arm_deadline()
        return True

    def verdict_ready(
        self, known_binary: BinaryInfo | None, config: Path | None, flags: Sequence[str] = ()
    ) -> bool:
        """Whether `begin` with these arguments would pass at once: nothing to run (a
        known binary, validation off), or only the validation run ahead, exactly it,
        finished and passed; and its config's facts known. A dry run of `begin` on a
        preflight of its own: nothing here changes."""
        if self.busy:
            return False
        preflight = self._new_preflight(known_binary, config, flags)
        argvs = preflight.remaining_argvs()
        if preflight.binary_changed or len(argvs) > 1:  # (a missing binary: refused below)
            return False
        if argvs:
            ahead = self._ahead
            result = ahead.result() if ahead is not None and ahead.argv == tuple(argvs[0]) else None
            if result is None:
                return False
            preflight.feed(result)
        if preflight.next_argv() is not None:
            return False  # more to run (or the outcome is in: then None)
        facts_of = self._config_of(config)
        outcome = preflight.outcome
        return (
            outcome is not None
            and outcome.ok
            and (facts_of is None or self.bootstrap.lookup(facts_of) is not None)
        )

    def read_facts_now(self, config: Path) -> BootstrapFacts | None:
        """A small config's facts (parsed now, and kept for `begin`); None for a big one:
        its parse, in a child, is started only by a check that will surely be used."""
        return self.bootstrap.read_small(config)

    def facts_before_loop(self, config: Path) -> BootstrapFacts:
        """Blocking, before the loop runs: the config's facts, from the child the start-up
        check began (`BootstrapReader.wait_for`)."""
        return self.bootstrap.wait_for(config)

    @property
    def ahead(self) -> bool:
        """Whether a validation started ahead is there for `begin` to take."""
        return self._ahead is not None

    def drop_ahead(self) -> None:
        """What was started ahead is stale: killed now (its group), reaped on SIGCHLD."""
        command, self._ahead = self._ahead, None
        if command is None:
            return
        command.kill()
        self._unlisten(command)
        self._dropped.append(command)
        self._arm_deadline()

    def bootstrap_facts(self, config: Path | None) -> BootstrapFacts | None:
        """What the config a verdict was about names (`config`, or --config when None):
        parsed while it was validated."""
        path = self._config_of(config)
        return self.bootstrap.latest(path) if path is not None else None

    def child_pids(self) -> set[int]:
        commands = [self._command, self._ahead, *self._dropped]
        return {c.pid for c in commands if c is not None} | self.bootstrap.child_pids()

    def owns(self, key: Hashable) -> bool:
        """Whether an fd event's key is one of our commands' pipes."""
        return key is not None and (
            key is self._command or key is self._ahead or self.bootstrap.owns(key)
        )

    def on_output(self, key: Hashable) -> None:
        command = self._command if key is self._command else self._ahead
        if command is None or key is not command:
            self.bootstrap.on_output(key)
            return
        for fd in command.open_fds():
            if not command.pump(fd):
                self._reactor.remove_reader(fd)

    def on_deadline(self) -> None:
        """Kill what is past its deadline; reaped on SIGCHLD, its result says it timed
        out. The one deadline key is armed at the earliest of them again."""
        now = self._reactor.now()
        for command in (self._command, self._ahead):
            if command is not None and command.deadline <= now and not command.finished:
                command.kill()  # taken or not, its result says it timed out
        self.bootstrap.on_deadline(now)
        self._arm_deadline()

    def poll(self) -> PreflightOutcome | None:
        """On SIGCHLD: keep what a finished parse found, feed a finished command to the
        preflight; the outcome once done (and, if it passed, its config's facts in)."""
        self.bootstrap.poll()
        self._dropped = [c for c in self._dropped if not c.finished]
        if self._ahead is not None:
            _ = self._ahead.finished  # reaped now: its time ends at its exit
        command = self._command
        result = command.result() if command is not None else None
        if command is not None and result is not None:
            self._drop(command)
            assert self._preflight is not None
            self._preflight.feed(result)
            self._outcome = self._next_step()
        self._arm_deadline()
        return self._release()

    def abandon(self) -> None:
        """On shutdown: kill and reap the running commands, forget the preflight."""
        command = self._command
        if command is not None:
            self._drop(command)
            command.abandon()
        self.drop_ahead()
        for dropped in self._dropped:
            dropped.abandon()
        self._dropped.clear()
        self.bootstrap.abandon()
        self._reactor.cancel(self._deadline_key)
        self._preflight = self._outcome = self._facts_of = None

    def _release(self) -> PreflightOutcome | None:
        """The verdict, unless it passed and its config is still being read: the
        supervisor acts on a pass at once, and needs to know what the config writes."""
        outcome = self._outcome
        if outcome is None:
            return None
        if outcome.ok and self._facts_of is not None and self.bootstrap.pending(self._facts_of):
            return None  # the parse's exit (SIGCHLD) brings it out
        self._outcome = self._facts_of = None
        return outcome

    def _arm_deadline(self) -> None:
        deadlines = [self.bootstrap.next_deadline()]
        for command in (self._command, self._ahead):
            if command is not None and not command.finished:
                deadlines.append(command.deadline)
        due = [at for at in deadlines if at is not None]
        if due:
            self._reactor.set_deadline(self._deadline_key, min(due))
        else:
            self._reactor.cancel(self._deadline_key)

    def _next_step(self) -> PreflightOutcome | None:
        preflight = self._preflight
        assert preflight is not None
        while (argv := preflight.next_argv()) is not None:
            command = self._take_ahead(argv, preflight)
            if command is None:
                try:
                    command = RunningCommand(argv, preflight.timeout_s)
                except OSError as err:
                    preflight.feed(CommandResult(tuple(argv), 127, "", str(err), 0.0))
                    continue
                self._listen(command)
            self._command = command
            result = command.result()  # one taken from ahead may be done already
            if result is None:
                return None
            self._drop(command)
            preflight.feed(result)
        self._preflight = None
        return preflight.outcome

    def _take_ahead(self, argv: list[str], preflight: Preflight) -> RunningCommand | None:
        """The command started ahead if it is exactly `argv`; its time counts from then."""
        command = self._ahead
        if command is None or command.argv != tuple(argv):
            return None
        self._ahead = None
        # Its own time, not the wait for the burst: one done 0.2 s before took 0.04 s.
        preflight.started_at = min(preflight.started_at, time.monotonic() - command.elapsed_s)
        return command

    def _listen(self, command: RunningCommand) -> None:
        for fd in command.open_fds():
            self._reactor.add_reader(fd, command)

    def _unlisten(self, command: RunningCommand) -> None:
        for fd in command.all_fds():
            self._reactor.remove_reader(fd)
        command.close()

    def _drop(self, command: RunningCommand) -> None:
        self._unlisten(command)
        self._command = None
