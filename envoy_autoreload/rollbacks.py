"""What a failed probation starts: the last known good generation, at once.

A generation that fails its health gate is replaced by the newest one that passed,
with a hot restart when it still serves (the drain wait is skipped: every second spent
waiting is a second of traffic on the bad config), or by recovery's respawn or cold
start when it died. The files on disk stay as pushed: the failed bytes are remembered
(`Outcome.FAILED`) and not tried again until they change, so the rollback does not
bounce back on the next file event.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from envoy_autoreload.batches import Batches
from envoy_autoreload.control import ControlReply
from envoy_autoreload.generations import ConfigGeneration
from envoy_autoreload.lineage import Lineage
from envoy_autoreload.logs import log_event
from envoy_autoreload.planner import Planner
from envoy_autoreload.ports import Reactor
from envoy_autoreload.roster import Generation, Roster
from envoy_autoreload.settings import Settings
from envoy_autoreload.states import GenerationState, StartNext, Timer
from envoy_autoreload.telemetry import Telemetry

logger = logging.getLogger(__name__)

ROLLBACK_REASON = "rollback"
MANUAL_REASON = "control rollback"


@dataclass(frozen=True, slots=True)
class _Pending:
    bad: ConfigGeneration | None
    good: ConfigGeneration
    check: str


class Rollbacks:
    def __init__(
        self,
        settings: Settings,
        reactor: Reactor,
        roster: Roster,
        planner: Planner,
        lineage: Lineage,
        telemetry: Telemetry,
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self._roster = roster
        self._planner = planner
        self._lineage = lineage
        self._telemetry = telemetry
        self._pending: _Pending | None = None

    def failed_probation(self, gen: Generation, check: str, saw: str) -> None:
        """Probation's hook: roll back from `gen`, or say why not."""
        bad = gen.config
        short = bad.short if bad is not None else None
        if not self._settings.rollback or self._lineage.script_ignores_snapshot:
            why = (
                "--no-rollback"
                if not self._settings.rollback
                else "the start script ignores $ENVOY_AUTORELOAD_SNAPSHOT"
            )
            log_event(
                logger,
                logging.WARNING,
                "rollback.skipped",
                f"{why}: epoch {gen.epoch} keeps its config",
                epoch=gen.epoch,
                config=short,
            )
            return
        good = self._lineage.last_good()
        if good is None or bad is None or good.sha256 == bad.sha256:
            log_event(
                logger,
                logging.ERROR,
                "rollback.impossible",
                "no config has passed probation yet: nothing to roll back to",
                epoch=gen.epoch,
                config=short,
            )
            return
        self._start(gen, _Pending(bad, good, check))

    def _start(
        self, gen: Generation, pending: _Pending, reason: str = ROLLBACK_REASON, seq: int = 0
    ) -> None:
        self._pending = pending
        self._telemetry.rollbacks.labels(reason=pending.check).inc()
        log_event(
            logger,
            logging.WARNING,
            "rollback.started",
            f"rolling back from {_short(pending.bad)} to the last good {pending.good.short}; "
            "the files on disk stay as pushed",
            epoch=gen.epoch,
            pid=gen.pid,
            config=_short(pending.bad),
            to_config=pending.good.short,
            check=pending.check,
        )
        if gen.state is not GenerationState.SERVING or self._planner.plan is not None:
            return  # recovery starts the last good one; a newer push replaces it anyway
        plan = StartNext(reason, seq, None, pending.good, rollback=True)
        self._planner.replan(plan, "rollback")
        # A failed probation does not wait for the drain: every second spent waiting is
        # traffic on the bad config. An operator's rollback waits as any restart does.
        self._planner.drain_wait_over = pending.check != "manual"
        self._reactor.set_timeout(Timer.ADVANCE, 0)

    def manual(self, prefix: str | None, batches: Batches, gate_busy: bool) -> ControlReply | int:
        """`envoy-autoreloadctl rollback [PREFIX]`: start a stored generation (the last
        good one by default), no gate (it passed before); the request's number, to be
        answered once it serves, or the reply now when it cannot start."""
        try:
            target = self._lineage.find(prefix) if prefix else self._lineage.last_good()
        except LookupError as err:
            return ControlReply(False, str(err))
        if target is None:
            return ControlReply(
                False, "no config has passed probation yet: nothing to roll back to"
            )
        serving = self._roster.serving()
        busy = gate_busy or self._planner.plan is not None or bool(batches.queued)
        if serving is None or busy or self._roster.starting() is not None:
            return ControlReply(False, "a restart or recovery is under way; try again after it")
        if serving.config is not None and serving.config.sha256 == target.sha256:
            return ControlReply(True, f"already serving {target.short}", serving.epoch)
        seq, _first = batches.add(MANUAL_REASON)
        self._start(serving, _Pending(serving.config, target, "manual"), batches.take(), seq)
        return seq

    def history(self) -> list[dict[str, object]]:
        return self._lineage.history()

    def on_live(self, gen: Generation) -> None:
        """What serves now (status, metrics, recovery's target), and a rollback that
        finished; history beyond --keep-generations goes."""
        lineage = self._lineage
        previous, lineage.serving = lineage.serving, gen.config
        self._telemetry.serving_config(gen.config.sha256 if gen.config else None)
        lineage.prune([gen.config, lineage.last_good()])
        pending = self._pending
        if pending is not None and gen.config not in (pending.good, pending.bad):
            self._moot(pending, gen)
            pending = None
        elif pending is not None and gen.config == pending.bad and not self._planned():
            self._pending = pending = None  # started again on purpose, or recovered
        if pending is None or gen.config != pending.good:
            if gen.config != previous:
                lineage.rolled_back_from = None  # /status: a newer config serves now
            return
        self._pending = None
        if self._planned():
            self._planner.replan(None, "rollback_moot")  # done by what went LIVE now
        assert gen.config is not None
        lineage.rolled_back_from = pending.bad
        log_event(
            logger,
            logging.WARNING,
            "rollback.finished",
            f"serving the last good {pending.good.short} again instead of {_short(pending.bad)}",
            epoch=gen.epoch,
            pid=gen.pid,
            config=pending.good.short,
            from_config=_short(pending.bad),
        )

    def resume(self, serving: Generation) -> None:
        """A rollback from a failed probation that got no plan (another plan held the
        next start, and it was carried out or dropped) while the failed config still
        serves: planned now. Called when nothing else is planned or starting."""
        pending = self._pending
        if pending is None or pending.check == "manual" or serving.config != pending.bad:
            return
        self._planner.replan(
            StartNext(ROLLBACK_REASON, 0, None, pending.good, rollback=True), "rollback"
        )
        self._planner.drain_wait_over = True
        self._reactor.set_timeout(Timer.ADVANCE, 0)

    def _planned(self) -> bool:
        plan = self._planner.plan
        return isinstance(plan, StartNext) and plan.rollback

    def _moot(self, pending: _Pending, gen: Generation) -> None:
        """A newer push went LIVE before the rollback from `pending.bad` started (it was
        starting when that config failed): the bad config serves no more, and rolling
        back now would replace the operator's newest validated config with an older one.
        The failure stands in the history; the newer one gets its own probation."""
        self._pending = None
        if self._planned():
            self._planner.replan(None, "rollback_moot")
        log_event(
            logger,
            logging.INFO,
            "rollback.skipped",
            f"epoch {gen.epoch} serves {_short(gen.config)}, pushed after "
            f"{_short(pending.bad)} failed: no rollback to {pending.good.short}",
            epoch=gen.epoch,
            pid=gen.pid,
            config=_short(gen.config),
        )


def _short(config: ConfigGeneration | None) -> str:
    return config.short if config is not None else "unknown"
