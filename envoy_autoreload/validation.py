"""The gate every requested restart passes: is the binary Envoy, is it hot-restart
compatible, and does the config validate with the binary that will run?

`envoy --mode validate -c CONFIG` catches broken YAML, unknown fields, routes to
unknown clusters and missing files in ~40 ms without touching running Envoys
(ENVOY_FACTS §1). It cannot see a port held by another process or a missing runtime
dependency: those surface only in the real child, which the supervisor handles.

Binary checks run only when the binary changed (by its stat identity): a package
upgrade renames a new file over the old one, and a half-written binary fails
`--version`, so "answers --version as Envoy" is also "whole". `--hot-restart-version`
then tells whether a hot restart into it can work at all: a different version means a
different shared-memory layout, and the child would abort (§14, #14224).

`Preflight` is a step machine: it hands out one command at a time and is fed the
result, so the same logic runs inside the event loop (the supervisor) and blocking at
start-up (`run_preflight_now`).
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from envoy_autoreload.command import (
    CommandResult,
    CommandsAhead,
    Running,
    describe_exit,
    run_all_now,
)

# BinaryInfo is re-exported: callers that only validate need not know where it lives.
from envoy_autoreload.envoy_binary import BinaryInfo as BinaryInfo
from envoy_autoreload.envoy_binary import binary_identity

if TYPE_CHECKING:
    from envoy_autoreload.settings import Settings

_VERSION_RE: Final = re.compile(r"version:\s*(\S+)")
_HOT_RESTART_RE: Final = re.compile(r"^\d+\.\d+$")
_VALIDATED_RE: Final = re.compile(r"^configuration '.*' OK$", re.MULTILINE)
_LOG_PREFIX_RE: Final = re.compile(r"^(\[[^\]]*\]\s*)+")
# A binary refused while Envoy runs: the serving one stays. Not said at start-up, where
# nothing is being restarted (`at_start_up`).
NOT_RESTARTING: Final = "; not restarting onto it"


class Verdict(enum.Enum):
    PASSED = "validation.passed"
    FAILED = "validation.failed"
    BINARY_REFUSED = "binary.refused"
    KNOWN_BAD = "config.known_bad"  # these bytes failed probation before


@dataclass(frozen=True, slots=True)
class PreflightOutcome:
    verdict: Verdict
    message: str
    detail: str | None
    binary: BinaryInfo | None
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.PASSED


def envoy_error_line(output: str) -> str | None:
    """Envoy's own reason: the text of its `critical` line, else its last non-empty line.
    Runs of spaces become one: protobuf pads its errors at random ("no   such field")
    so that nobody parses them, and a reader should not have to see that either."""
    lines = [" ".join(line.split()) for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if "[critical]" in line:
            return _LOG_PREFIX_RE.sub("", line)
    return lines[-1] if lines else None


def at_start_up(message: str) -> str:
    """A refusal's words before anything runs: nothing is being restarted onto it."""
    return message.removesuffix(NOT_RESTARTING)


class _Step(enum.Enum):
    VERSION = "version"
    HOT_RESTART_VERSION = "hot_restart_version"
    VALIDATE = "validate"


class Preflight:
    """Checks the binary (when it changed) and validates the config, one command at a time."""

    def __init__(
        self,
        envoy: Path,
        config: Path | None,
        *,
        known_binary: BinaryInfo | None,
        timeout_s: float,
        flags: Sequence[str] = (),
        hot_restart_version: bool = True,
    ) -> None:
        self.envoy = envoy
        self.config = config
        self.flags = tuple(flags)
        self.timeout_s = timeout_s
        self.started_at = time.monotonic()
        self.outcome: PreflightOutcome | None = None
        self._steps: list[_Step] = []
        self._version: str | None = None
        self._binary: BinaryInfo | None = None
        self.identity = identity = binary_identity(envoy)
        if identity is None or not os.access(envoy, os.X_OK):
            self._finish(
                Verdict.BINARY_REFUSED,
                f"Envoy binary {envoy} is missing or not executable",
                None,
            )
            return
        self._identity = identity
        if known_binary is not None and known_binary.identity == identity:
            self._binary = known_binary
        else:
            self._steps.append(_Step.VERSION)
            if hot_restart_version or config is None:
                self._steps.append(_Step.HOT_RESTART_VERSION)
        # Without --hot-restart-version, Envoy's own words on a passed validation prove
        # that the binary is Envoy (ENVOY_FACTS §1): `true` passes any validation.
        self._validation_proves = _Step.VERSION in self._steps and (
            _Step.HOT_RESTART_VERSION not in self._steps
        )
        if config is not None:
            self._steps.append(_Step.VALIDATE)

    @property
    def binary_changed(self) -> bool:
        return _Step.VERSION in self._steps or self._version is not None

    def next_argv(self) -> list[str] | None:
        if self.outcome is not None:
            return None
        if not self._steps:
            self._finish(Verdict.PASSED, "", None)
            return None
        return self._argv(self._steps[0])

    def remaining_argvs(self) -> list[list[str]]:
        """Every command still to run, in order: none needs another's answer."""
        return [] if self.outcome is not None else [self._argv(step) for step in self._steps]

    def _argv(self, step: _Step) -> list[str]:
        match step:
            case _Step.VERSION:
                return [str(self.envoy), "--version"]
            case _Step.HOT_RESTART_VERSION:
                return [str(self.envoy), "--hot-restart-version"]
            case _Step.VALIDATE:
                assert self.config is not None
                return [str(self.envoy), "--mode", "validate", "-c", str(self.config), *self.flags]

    def feed(self, result: CommandResult) -> None:
        step = self._steps.pop(0)
        match step:
            case _Step.VERSION:
                match = _VERSION_RE.search(result.stdout) if result.returncode == 0 else None
                if match is None:
                    self._refuse_binary("--version", "no Envoy version", result)
                    return
                self._version = match.group(1)
                if _Step.HOT_RESTART_VERSION not in self._steps:
                    self._binary = BinaryInfo(self.envoy, self._identity, self._version, None)
            case _Step.HOT_RESTART_VERSION:
                # Envoy prints it to stderr, without a newline (ENVOY_FACTS §14).
                text = (
                    (result.stderr.strip() or result.stdout.strip())
                    if result.returncode == 0
                    else ""
                )
                if not _HOT_RESTART_RE.match(text) or self._version is None:
                    self._refuse_binary("--hot-restart-version", "no hot-restart version", result)
                    return
                self._binary = BinaryInfo(self.envoy, self._identity, self._version, text)
            case _Step.VALIDATE:
                if result.returncode == 0 and self._validation_proves:
                    if not _VALIDATED_RE.search(result.stdout):
                        self._refuse_binary("--mode validate", 'no "configuration ... OK"', result)
                elif result.returncode != 0:
                    self._finish(
                        Verdict.FAILED,
                        f"validation failed: {_failure_reason(result, self.timeout_s)}",
                        result.output or None,
                    )

    def _refuse_binary(self, option: str, wanted: str, result: CommandResult) -> None:
        """`/bin/true is not Envoy: '--version' printed no Envoy version`: the daemon's
        words; what the binary printed is the detail (`true --version`'s last line is
        "Written by Jim Meyering.", no reason at all)."""
        if result.timed_out:
            why = f"timed out after {self.timeout_s:g} s"
        elif result.returncode == 0:
            why = f"printed {wanted}"
        else:
            assert result.returncode is not None
            line = envoy_error_line(result.output) if result.returncode > 0 else None
            why = f"failed ({describe_exit(result.returncode)}{f': {line}' if line else ''})"
        self._finish(
            Verdict.BINARY_REFUSED,
            f"{self.envoy} is not Envoy: {option!r} {why}{NOT_RESTARTING}",
            result.output or None,
        )

    def _finish(self, verdict: Verdict, message: str, detail: str | None) -> None:
        self._steps.clear()
        self.outcome = PreflightOutcome(
            verdict=verdict,
            message=message,
            detail=detail,
            binary=self._binary if verdict is Verdict.PASSED else None,
            duration_s=round(time.monotonic() - self.started_at, 3),
        )


def _failure_reason(result: CommandResult, timeout_s: float) -> str:
    if result.timed_out:
        return f"timed out after {timeout_s:g} s"
    assert result.returncode is not None
    if result.returncode < 0:
        return describe_exit(result.returncode)
    return envoy_error_line(result.output) or describe_exit(result.returncode)


# What the start-up checks learned of each binary: the gate's check before epoch 0 reuses
# it while the file is the same one (its identity), instead of running `--version` and
# `--hot-restart-version` a second time, a tenth of a second before Envoy starts.
_BINARIES_CHECKED: dict[Path, BinaryInfo] = {}


def checked_binary(path: Path) -> BinaryInfo | None:
    return _BINARIES_CHECKED.get(path)


def preflight_for(
    settings: Settings,
    known_binary: BinaryInfo | None,
    config: Path | None,
    flags: Sequence[str] = (),
    *,
    hot_restart_version: bool = True,
) -> Preflight:
    """`config` is the snapshot to validate (or --config itself without generations)."""
    assert settings.envoy is not None
    return Preflight(
        settings.envoy,
        (config or settings.config) if settings.validate else None,
        known_binary=known_binary,
        timeout_s=settings.validate_timeout_s,
        flags=flags,
        hot_restart_version=hot_restart_version,
    )


def first_check(settings: Settings, config: Path | None, flags: Sequence[str] = ()) -> Preflight:
    """The check before epoch 0 (the gate's, and `head_start`'s ahead of it). The
    binary's hot-restart version is not asked: nothing runs to compare it with, and
    the Envoy that starts reports its own; 60 ms of CPU less beside the validation and
    the walk (issue 16)."""
    assert settings.envoy is not None
    known = checked_binary(settings.envoy)  # by an earlier start-up check
    return preflight_for(settings, known, config, flags, hot_restart_version=False)


# The start-up check's commands, when `head_start` launched them before the gate existed:
# at most one set, taken by the first `run_preflight_now` (or dropped).
_AHEAD: Final[list[CommandsAhead]] = []


@contextlib.contextmanager
def commands_ahead(preflight: Preflight | None) -> Iterator[None]:
    """Start `preflight`'s commands now; whatever is not taken by then is killed on exit."""
    if preflight is not None and (argvs := preflight.remaining_argvs()):
        _AHEAD.append(CommandsAhead(preflight.identity, argvs))
    try:
        yield
    finally:
        drop_commands_ahead()


def drop_commands_ahead() -> None:
    while _AHEAD:
        _AHEAD.pop().close()
    _DECIDED.clear()


# The start-up check's verdict, when `head_start` waited for it to spawn epoch 0 before
# the rest of the daemon is imported: the gate's start-up check of the same snapshot, on
# the same binary file, with the same flags, takes it instead of checking again.
_DECIDED: Final[dict[Hashable, PreflightOutcome]] = {}


def _decision_key(preflight: Preflight) -> Hashable:
    return preflight.identity, preflight.config, preflight.flags


def decide_ahead(preflight: Preflight) -> PreflightOutcome:
    """`run_preflight_now`, its verdict kept for the first one asked the same."""
    outcome = run_preflight_now(preflight)
    _DECIDED[_decision_key(preflight)] = outcome
    return outcome


def _take_ahead(preflight: Preflight, argvs: list[list[str]]) -> Running:
    """Only exactly these commands for the same binary: the snapshot's path names its
    bytes, so a config changed since is another argv, and runs afresh. The check's
    duration then counts from when they started."""
    if not _AHEAD:
        return {}
    ahead = _AHEAD.pop()
    taken = ahead.take(preflight.identity, argvs)
    if taken:
        preflight.started_at = min(preflight.started_at, ahead.started_at)
    return taken


def run_preflight_now(preflight: Preflight) -> PreflightOutcome:
    """Blocking, for start-up checks before the loop runs. Every step runs at once:
    `--version`, `--hot-restart-version` and the validation are independent commands,
    one after another 0.16 s of the time before epoch 0 serves (issue 16). Their
    results are taken in order, so the first failure is the verdict, as before."""
    decided = _DECIDED.pop(_decision_key(preflight), None)
    if decided is not None:
        preflight.outcome = decided
        return decided
    argvs = preflight.remaining_argvs()
    ahead = _take_ahead(preflight, argvs)
    for result in run_all_now(argvs, preflight.timeout_s, ahead):
        if preflight.outcome is not None:
            break
        preflight.feed(result)
    preflight.next_argv()  # no step left: this finishes it
    outcome = preflight.outcome
    assert outcome is not None
    if outcome.binary is not None:
        _BINARIES_CHECKED[outcome.binary.path] = outcome.binary
    return outcome
