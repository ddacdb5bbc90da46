"""The supervisor's side of the gate: what a preflight (binary checks, `envoy --mode
validate`) was asked about, and what its outcome says.

The commands themselves run behind the `Gate` port (real: `gate.CommandGate`). This
module pins what is being validated, logs the verdict, refuses what failed, and tells
whether a new binary can hot restart at all (`--hot-restart-version`, ENVOY_FACTS §14,
#14224). Whether to start, requeue or stop is the supervisor's decision.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from envoy_autoreload.batches import Batches
from envoy_autoreload.bootstrap_facts import INLINE_MAX_BYTES, BootstrapFacts, read_facts
from envoy_autoreload.digest import Snapshot
from envoy_autoreload.envoy_binary import BinaryInfo
from envoy_autoreload.errors import BinaryError, ValidationFailed
from envoy_autoreload.family import EnvoyFamily
from envoy_autoreload.gate import CommandGate
from envoy_autoreload.generations import ConfigGeneration
from envoy_autoreload.lineage import Lineage
from envoy_autoreload.logs import log_event
from envoy_autoreload.ports import EnvoyFacts, Gate
from envoy_autoreload.roster import Generation
from envoy_autoreload.settings import Settings
from envoy_autoreload.validation import PreflightOutcome, Verdict, at_start_up

if TYPE_CHECKING:
    from envoy_autoreload.head_start import EarlyEpoch0

logger = logging.getLogger(__name__)
_FAILED: Final = "validation failed: "
# Envoy's words before its reason name the file validated; the start-up line names it.
_INITIALIZING_RE: Final = re.compile(r"^error initializing configuration '[^']*': ")


class Gatekeeper:
    def __init__(
        self,
        settings: Settings,
        gate: Gate,
        batches: Batches,
        family: EnvoyFacts,
        lineage: Lineage,
    ) -> None:
        self._settings = settings
        self.gate = gate
        self._batches = batches
        self._family = family
        self._lineage = lineage
        if isinstance(gate, CommandGate) and isinstance(family, EnvoyFamily):
            # One reader of configs: the gate runs it (children, SIGCHLD, deadlines),
            # the family asks it for a generation's admin address.
            family.bootstrap = gate.bootstrap
        self.config: ConfigGeneration | None = None  # the snapshot being validated
        self.binary: BinaryInfo | None = None  # the newest binary that passed
        self.first_pin: str | None = None  # sha256 of --config as the start-up check read it
        self.reason = ""  # the batch being checked
        self.seq = 0
        self.content: Snapshot | None = None  # pinned before validating

    def check_before_first_start(self, early: EarlyEpoch0 | None = None) -> None:
        """Start-up: refuse to start Envoy on a binary that is not Envoy or a config that
        does not validate (blocking is fine: the loop is not running yet). A refusal is
        the one `envoy-autoreload: error:` line cli.py prints; Envoy's output is logged
        as its detail in JSON only, never as human lines. `early`: epoch 0 was spawned
        already, on the snapshot the check passed (`head_start.py`)."""
        self.config = self._first_config(early)
        if not self.gate.enabled:
            return
        checked = self.config.path if self.config is not None else None
        outcome = self.named(self.gate.check_now(checked))
        match outcome.verdict:
            case Verdict.PASSED:
                self.log_outcome(outcome, epoch=0, serving=False)
                self.binary = outcome.binary
            case Verdict.BINARY_REFUSED:
                self._log_refusal_for_json(outcome)
                raise BinaryError(at_start_up(outcome.message))
            case Verdict.FAILED if not self._start_last_good_instead(outcome):
                self._log_refusal_for_json(outcome)
                reason = _INITIALIZING_RE.sub("", outcome.message.removeprefix(_FAILED), count=1)
                raise ValidationFailed(
                    f"the config {self._settings.config} does not validate, so Envoy is not "
                    f"started: {reason}{_relative_hint(checked, reason)}"
                )

    def _log_refusal_for_json(self, outcome: PreflightOutcome) -> None:
        """A machine reading the JSON log gets the event and Envoy's whole output; a
        human reads the error line alone."""
        if self._settings.log_format == "json":
            message = at_start_up(outcome.message)  # nothing is being restarted onto it
            self.log_outcome(dataclasses.replace(outcome, message=message), 0, serving=False)

    def _start_last_good_instead(self, failed: PreflightOutcome) -> bool:
        """A config on disk that does not validate at start-up (a bad push while the
        daemon was down, a reboot mid-push) need not keep Envoy down when history holds
        a good one: it starts, if it still validates, and the files stay as pushed."""
        pushed, good = self.config, self._lineage.last_good()
        if good is None or (pushed is not None and pushed.sha256 == good.sha256):
            return False
        outcome = self.gate.check_now(good.path)
        if not outcome.ok:
            return False
        shown = dataclasses.replace(failed, detail=self._json_only(failed.detail))
        self.log_outcome(shown, epoch=0, serving=False)
        self.config, self.binary = good, outcome.binary
        log_event(
            logger,
            logging.WARNING,
            "config.invalid_at_start",
            f"{self._settings.config} does not validate; starting the last good generation "
            f"{good.short} instead. Push a fixed config",
            config=good.short,
        )
        return True

    def _json_only(self, detail: str | None) -> str | None:
        """At start-up Envoy's output is the JSON log's detail only: the message already
        carries its reason in one line."""
        return detail if self._settings.log_format == "json" else None

    def _first_config(self, early: EarlyEpoch0 | None) -> ConfigGeneration | None:
        """What epoch 0 starts: the config as it is now (or as it was pinned for the
        epoch 0 spawned early), unless these very bytes failed probation before (history
        outlives the daemon) and a good one is kept."""
        pinned = early.config if early is not None else self._lineage.pin()
        self.first_pin = pinned.sha256 if pinned is not None else None
        good = self._lineage.last_good()
        if not self._lineage.failed(pinned) or good is None or pinned is None:
            return pinned
        log_event(
            logger,
            logging.WARNING,
            "config.known_bad",
            f"the config on disk ({pinned.short}) failed probation before; starting the "
            f"last good generation {good.short} instead. Push a fixed config, or "
            "`envoy-autoreloadctl reload --force` to try it again",
            config=good.short,
        )
        return good

    def begin(
        self, reason: str, seq: int, content: Snapshot | None, flags: Sequence[str] = ()
    ) -> PreflightOutcome | None:
        """Check the batch `seq`; the config is snapshotted first and the snapshot is
        what is validated and started, byte for byte (REVIEW-core finding 8b), with the
        config-affecting `flags` the serving Envoy runs with. The outcome now if nothing
        had to run, else later from `poll()`."""
        self.reason, self.seq, self.content = reason, seq, content
        self.config = config = self._lineage.pin()
        if self._lineage.failed(config) and "--force" not in reason:
            assert config is not None
            return PreflightOutcome(
                Verdict.KNOWN_BAD,
                f"config {config.short} failed probation before; not tried again until it "
                "changes (or `envoy-autoreloadctl reload --force`)",
                None,
                None,
                0.0,
            )
        return self.gate.begin(self.binary, config.path if config is not None else None, flags)

    def check_ahead(self, flags: Sequence[str], safe: Callable[[BootstrapFacts], bool]) -> bool:
        """Stage --config as it is now and start the validation `begin` would run for
        it (`check_ahead.py`), if what it names is `safe` to validate early; False when
        nothing was started. Not for bytes that failed probation (`begin` refuses those
        without running anything), nor for a big config, whose facts only a child
        parses, and only for a check that will surely be used. With validation off the
        snapshot is still staged and its facts read: `begin` then finds both done
        (issue 16: they were 1.1 ms of the 2 ms from the burst's end to its spawn)."""
        if self._config_is_big():
            return False  # not read twice
        if not (self.gate.enabled and self._settings.validate):
            staged = self._lineage.stage()
            if staged is not None:
                self.gate.read_facts_now(staged.path)
            return False  # nothing to run ahead
        config = self._lineage.stage()
        if config is None or self._lineage.failed(config):
            return False  # generations off: nothing would pin what it validated
        facts = self.gate.read_facts_now(config.path)
        if facts is None or not safe(facts):
            return False
        return self.gate.check_ahead(self.binary, config.path, flags)

    @property
    def staged_for_start(self) -> bool:
        """A config staged with nothing to validate (validation off): its burst's
        `begin` has nothing to run either, unless the binary changed."""
        gate = self.gate
        return gate.enabled and not self._settings.validate and self._lineage.staged is not None

    def ready_to_start(self, flags: Sequence[str]) -> ConfigGeneration | None:
        """The staged config, when `begin` for the same bytes would pass at once: the
        validation run ahead on exactly them passed, or nothing has to run. None for
        bytes that failed probation (`begin` refuses them) and for a big config."""
        config = self._lineage.staged
        if config is None or not self.gate.enabled or self._lineage.failed(config):
            return None
        if self._config_is_big():
            return None
        return config if self.gate.verdict_ready(self.binary, config.path, flags) else None

    def _config_is_big(self) -> bool:
        config = self._settings.config
        try:
            return config is None or os.stat(config).st_size > INLINE_MAX_BYTES
        except OSError:
            return False  # staging it fails too, or reads it some other way

    def named(self, outcome: PreflightOutcome) -> PreflightOutcome:
        """Envoy names the file it validated: the operator's --config, not our snapshot
        of it (whose hash is in the line too)."""
        config, given = self.config, self._settings.config
        if config is None or given is None:
            return outcome
        snapshot, name = str(config.path), f"{given} (snapshot {config.short})"
        return dataclasses.replace(
            outcome,
            message=outcome.message.replace(snapshot, name),
            detail=outcome.detail.replace(snapshot, name) if outcome.detail else None,
        )

    def log_outcome(self, outcome: PreflightOutcome, epoch: int | None, serving: bool) -> None:
        binary = outcome.binary
        config = self.config.short if self.config is not None else None  # what was checked
        if outcome.ok:
            log_event(
                logger,
                logging.INFO,
                Verdict.PASSED.value,
                epoch=epoch,
                config=config,
                duration_s=outcome.duration_s,
                version=binary.release if binary else None,
                # Of the binary, or else the running Envoy's (not asked before epoch 0).
                hot_restart_version=(binary.hot_restart_version if binary else None)
                or self._family.hot_restart_version,
            )
            return
        log_event(
            logger,
            logging.ERROR,
            outcome.verdict.value,
            outcome.message + (f"; epoch {epoch} keeps serving" if serving else ""),
            detail=outcome.detail,
            epoch=epoch,
            config=config,
            duration_s=outcome.duration_s,
        )

    def refuse(self, outcome: PreflightOutcome, status: str) -> None:
        invalid = outcome.verdict is Verdict.FAILED
        self._batches.finish(
            "validation_failed" if invalid else "refused",
            self.reason,
            seq=self.seq,
            error=outcome.message,
            status=status,
        )

    def incompatible_with(self, binary: BinaryInfo | None, serving: Generation) -> str | None:
        """The running hot-restart version when `binary` cannot hot restart into it.
        What the serving Envoy reported at LIVE wins over what we believed we started:
        a recovery start runs whatever binary is on disk."""
        if binary is None:
            return None
        believed = serving.binary or self.binary
        running = self._family.hot_restart_version or (
            believed.hot_restart_version if believed else None
        )
        asked = binary.hot_restart_version  # None: the start-up binary, never compared
        if running and asked is not None and asked != running:
            return running
        return None

    def refuse_incompatible(
        self, binary: BinaryInfo, running: str, serving: Generation, status: str
    ) -> None:
        what = _incompatibility(binary, running)
        log_event(
            logger,
            logging.ERROR,
            "binary.incompatible",
            f"{what}; keeping the running Envoy. To switch, restart the service (a full "
            "stop and start), or run with --on-incompatible-binary=restart",
            epoch=serving.epoch,
            pid=serving.pid,
            version=binary.release,
            hot_restart_version=binary.hot_restart_version,
        )
        self._batches.finish(
            "refused",
            self.reason,
            seq=self.seq,
            error=what,
            message=f"refused: {what}",
            status=status,
        )

    def announce_full_restart(self, binary: BinaryInfo, running: str) -> None:
        log_event(
            logger,
            logging.WARNING,
            "restart.full",
            f"{_incompatibility(binary, running)}; --on-incompatible-binary=restart: "
            "stopping every epoch and starting epoch 0 on it, accepting an outage until "
            "it is LIVE",
            version=binary.release,
            hot_restart_version=binary.hot_restart_version,
        )
        self.binary = binary


def _relative_hint(config: Path | None, reason: str) -> str:
    """When Envoy's reason names a relative path of the config: where it was looked
    for. The start script may `cd` elsewhere, where Envoy itself would find it."""
    if config is None:
        return ""
    references = read_facts(config, Path.cwd()).references
    named = [name for name in (references.relative if references else ()) if name in reason]
    if not named:
        return ""
    return (
        f" ({', '.join(named[:3])}: relative, so looked for in the daemon's working "
        f"directory, {Path.cwd()}; Envoy takes it from its own)"
    )


def _incompatibility(binary: BinaryInfo, running: str) -> str:
    return (
        f"{binary.path} ({binary.release}) has hot-restart version "
        f"{binary.hot_restart_version}, the running Envoy {running}: a hot "
        "restart into it cannot work (its shared memory differs, #14224)"
    )
