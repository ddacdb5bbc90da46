"""When nothing serves, or the family must go so epoch 0 can start: pacing, the crash
budget, stopping orphans, and epochs that hang in their drain.

The plan itself (`Respawn`, `ColdStart`) is the supervisor's decision; this module
knows how soon to try, when to give up, and how to stop what is in the way without
breaking Envoy's rules: never signal a draining parent while its successor lives
(ENVOY_FACTS §6), and kill what hangs (§7) only once it is nobody's parent.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from envoy_autoreload.backoff import (
    COLD_BACKOFF_CAP_S,
    COLD_BACKOFF_FIRST_S,
    CrashBudget,
    DeathPacing,
    exponential_delay,
)
from envoy_autoreload.batches import Batches
from envoy_autoreload.digest import Snapshot
from envoy_autoreload.generations import ConfigGeneration
from envoy_autoreload.lineage import Lineage
from envoy_autoreload.logs import log_event
from envoy_autoreload.planner import Planner
from envoy_autoreload.ports import EnvoyFacts, Reactor
from envoy_autoreload.roster import Generation, Roster
from envoy_autoreload.settings import Settings
from envoy_autoreload.states import ColdStart, GenerationState, Respawn, StartNext, Timer

logger = logging.getLogger(__name__)

EARLY_DRAIN_MARGIN_S: Final = 0.25
HUNG_DRAIN_GRACE_S: Final = 5.0
ORPHAN_REASON: Final = "no successor serves; stopped so epoch 0 can start"


@dataclass(frozen=True, slots=True)
class StartOrder:
    """What recovery wants started now."""

    epoch: int
    reason: str
    parent: Generation | None = None
    covers_seq: int = 0
    config: ConfigGeneration | None = None  # the snapshot to start (generations on)


class Recovery:
    def __init__(
        self,
        settings: Settings,
        reactor: Reactor,
        roster: Roster,
        family: EnvoyFacts,
        planner: Planner,
        batches: Batches,
        current: Callable[[], Snapshot | None],
        lineage: Lineage,
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self._roster = roster
        self._family = family
        self._planner = planner
        self._batches = batches
        self._current = current
        self._lineage = lineage
        self._cold_attempt_seq = 0  # newest request a cold start has already tried
        self._crash_budget = CrashBudget()
        self._death_pacing = DeathPacing()
        self._cold_failures = 0

    # -- what to start when nothing serves ----------------------------------------------
    def recover(self, *, backing_off: bool) -> StartOrder | None:
        """Respawn from a draining parent if one is there, else epoch 0 once the family
        is gone; None while waiting (for orphans to go, or a backoff)."""
        planner = self._planner
        plan = planner.plan
        if isinstance(plan, Respawn):
            parents = self._roster.draining()
            if parents:
                # Answers no reload: the dead epoch's own batch was answered when it went
                # LIVE, and requests since then still need the gate.
                planner.replan(None, "started")
                config = self._lineage.recovery_target()
                return StartOrder(plan.epoch, "recovery", parent=parents[-1], config=config)
            planner.replan(ColdStart("recovery"), "recovery")
        elif not isinstance(plan, ColdStart):
            # Nothing serves: whatever else was planned, recovery comes first. (With no
            # plan at all too: an exit whose handling a contained error cut short.)
            planner.replan(ColdStart("recovery"), "recovery")
        return self._cold_start()

    def _cold_start(self) -> StartOrder | None:
        cold = self._planner.plan
        assert isinstance(cold, ColdStart)
        orphans = self._roster.alive()
        if orphans:
            # Epoch 0 cannot bind its domain socket while any of the family lives
            # (#10902); a draining parent without a successor serves nothing.
            self.stop_orphans(orphans)
            return None
        # A request newer than the last cold attempt (an operator's SIGHUP, a fixed
        # config) skips the backoff once; queued requests are not consumed: they pass
        # the gate once something serves.
        fresh_request = self._batches.request_seq > self._cold_attempt_seq
        if self._reactor.has_deadline(Timer.RETRY) and not fresh_request:
            return None
        self._cold_attempt_seq = self._batches.request_seq
        self._planner.replan(None, "started")
        self._reactor.cancel(Timer.RETRY)
        reason = self._still_validated(cold)
        if self._lineage.enabled:
            # A snapshot, never the config file: the validated one this start carries,
            # else the last good one (REVIEW-core finding 8a).
            config = cold.config or self._lineage.recovery_target()
            return StartOrder(0, reason, covers_seq=cold.covers_seq, config=config)
        return StartOrder(0, reason, covers_seq=cold.covers_seq)

    def _still_validated(self, cold: ColdStart) -> str:
        """The start's reason; "recovery" when the files changed since the batch it
        carries was validated: what starts now is, in part, what is on disk, as in any
        recovery (REVIEW-core finding 8a). With generations the config is the validated
        snapshot, but the files it names (certificates, Lua, ...) are read where they
        are, as they are now."""
        if cold.content is None:
            return cold.reason
        current = self._current()
        if current is None or current.digest == cold.content.digest:
            return cold.reason
        what = "the validated config, with the files it names" if cold.config else "what is"
        log_event(
            logger,
            logging.WARNING,
            "restart.unvalidated",
            f"the files changed while the family stopped; epoch 0 starts {what} on disk "
            "now, which was not validated together",
            reason=cold.reason,
        )
        return "recovery"

    def full_restart(self, serving: Generation, plan: StartNext) -> None:
        """A doomed epoch cannot hot restart (its child hangs, measured); stop it and
        cold-start epoch 0 with the validated request: the ~0.1 s outage its abort would
        cause anyway, at a moment of the operator's choosing."""
        reason = "full restart: its parent died early, so it cannot hot restart"
        self._roster.mark_stopping(serving, reason)
        log_event(
            logger,
            logging.WARNING,
            "restart.full",
            f"{reason}; stopping it and starting epoch 0 (a short outage)",
            epoch=serving.epoch,
            pid=serving.pid,
        )
        cold = ColdStart(plan.reason, plan.seq, plan.content, plan.config)
        self._planner.replan(cold, "full_restart")
        # KILLed, not TERMed: with its parent gone a TERM starts 10 s of retries and
        # ends in SIGABRT anyway (measured by the conformance scenarios, §6).
        self._roster.mark_terminated(serving)
        serving.process.kill()

    # -- pacing ---------------------------------------------------------------------
    def export(self) -> dict[str, object]:
        """For a re-exec: the crash budget and pacing go on as they were."""
        return {
            "cold_attempt_seq": self._cold_attempt_seq,
            "cold_failures": self._cold_failures,
            "crash_failures": self._crash_budget.export(),
            "death_pacing": self._death_pacing.export(),
        }

    def restore(self, saved: dict[str, object]) -> None:
        seq, failures, crashes = (
            saved.get("cold_attempt_seq"),
            saved.get("cold_failures"),
            saved.get("crash_failures"),
        )
        self._cold_attempt_seq = seq if isinstance(seq, int) else 0
        self._cold_failures = failures if isinstance(failures, int) else 0
        if isinstance(crashes, list):
            self._crash_budget.restore([float(at) for at in crashes])
        pacing = saved.get("death_pacing")
        if isinstance(pacing, dict):
            self._death_pacing.restore(pacing)

    def served_again(self) -> None:
        self._cold_failures = 0

    def budget_spent(self, what: str) -> bool:
        """Count one failure while nothing serves; True (and logged) when the budget is
        spent and the daemon should exit for its process manager. The line counts the
        failures that happened, not the budget's size."""
        budget, now = self._crash_budget, self._reactor.now()
        if not budget.record(now):
            return False
        failures = budget.recent(now)
        log_event(
            logger,
            logging.ERROR,
            "daemon.crash_budget_exhausted",
            f"{failures} failure{'s' if failures != 1 else ''} within {budget.window_s:g} s "
            f"with nothing serving, the last: {what}; exiting so the process manager can "
            "take over",
            failures=failures,
        )
        return True

    def delay(self, *, respawn: bool, immediate: bool, served_s: float | None) -> float:
        """A death (`served_s`: how long the dead Envoy served) is met at once unless it
        is a crash loop (`DeathPacing`); a respawn from a draining parent never waits
        (the parent refuses new connections once its child died); `immediate` when that
        respawn failed and epoch 0 is the other way. Failed cold starts back off 1 s
        doubling to 30 s."""
        if served_s is not None:
            delay = self._death_pacing.delay_after(served_s, self._reactor.now())
            return 0.0 if respawn else delay
        if immediate:
            return 0.0
        self._cold_failures += 1
        return exponential_delay(self._cold_failures, COLD_BACKOFF_FIRST_S, COLD_BACKOFF_CAP_S)

    # -- stopping what is in the way -------------------------------------------------
    def stop_orphans(self, orphans: list[Generation]) -> None:
        """Newest first: a draining parent is never signalled while its successor lives
        (§6); once the successor is gone Envoy ends the parent (a "child request"), or
        it is TERMed then. A hung orphan (§7) is KILLed after --term-wait."""
        alive_epochs = {g.epoch for g in orphans}
        for orphan in reversed(orphans):
            if orphan.marks.stop_reason is None:
                self._roster.mark_stopping(orphan, ORPHAN_REASON)
                log_event(
                    logger,
                    logging.WARNING,
                    "child.stopping_orphan",
                    ORPHAN_REASON,
                    epoch=orphan.epoch,
                    pid=orphan.pid,
                )
            if orphan.epoch + 1 not in alive_epochs and not orphan.marks.terminated:
                self.terminate(orphan)

    def terminate(self, gen: Generation) -> None:
        """TERM one we decided to stop; KILL it after --term-wait if it hangs (§7)."""
        self._roster.mark_terminated(gen)
        gen.process.send_signal(signal.SIGTERM)
        if not self._reactor.has_deadline(Timer.ORPHAN_KILL):
            self._reactor.set_timeout(Timer.ORPHAN_KILL, self._settings.term_wait_s)

    def kill_orphans(self) -> None:
        for gen in self._roster.alive():
            if gen.marks.stop_reason is not None and gen.state is not GenerationState.STARTING:
                log_event(
                    logger, logging.WARNING, "child.killing_orphan", epoch=gen.epoch, pid=gen.pid
                )
                gen.process.kill()

    def stop_hung_drains(self, serving: Generation) -> None:
        """A draining epoch long past its parent-shutdown time that is nobody's parent
        any more blocks the next epoch (they share a domain socket modulo 3, §0) for as
        long as it hangs (§7). It serves nothing and no successor waits on it: KILLed
        (REVIEW-core finding 14). One whose successor lives is never touched (§6)."""
        shutdown_s = self._family.parent_shutdown_s(serving) or 0.0
        now = self._reactor.now()
        next_due: float | None = None
        alive_epochs = {g.epoch for g in self._roster.alive()}
        for gen in self._roster.draining():
            if gen.epoch + 1 in alive_epochs or gen.marks.stop_reason is not None:
                continue  # its successor lives: it must end by itself (§6)
            due = (gen.draining_since or gen.started_at) + shutdown_s + HUNG_DRAIN_GRACE_S
            if now < due:
                next_due = due if next_due is None else min(next_due, due)
                continue
            reason = f"still draining {HUNG_DRAIN_GRACE_S:g} s past its parent-shutdown time"
            self._roster.mark_stopping(gen, reason)
            log_event(
                logger,
                logging.WARNING,
                "child.hung_drain",
                f"{reason}; it blocks epoch {serving.epoch + 1}, so it is killed",
                epoch=gen.epoch,
                pid=gen.pid,
                config=gen.config_short,
            )
            gen.process.kill()
        if next_due is not None:
            self._reactor.set_deadline(Timer.HUNG_DRAIN, next_due)

    def died_early(self, gen: Generation, successor: Generation) -> bool:
        """A draining epoch exited before Envoy would have ended it; unknown timing never
        counts as early."""
        if gen.marks.drain_cut_by_restart or gen.draining_since is None:
            return False
        shutdown_s = self._family.parent_shutdown_s(successor)
        if shutdown_s is None:
            return False
        return self._reactor.now() < gen.draining_since + shutdown_s - EARLY_DRAIN_MARGIN_S
