"""Restart requests on their way in: coalesced into a batch, sent through the gate, and
turned into a plan (or answered at once: unchanged content, a path that went missing, a
refused config or binary).

Requests that ask for content a validated plan already carries join it instead of
superseding it (REVIEW-core finding 15); a plan whose content went back to what serves
is dropped and systemd is told READY (finding 9); nothing unvalidated starts, since a
change after validation goes back to the gate. What to start, and when, is the
supervisor's (`_advance`); what an exit means is `exits.py`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from envoy_autoreload.batches import Batches
from envoy_autoreload.check_ahead import CheckAhead
from envoy_autoreload.control import ControlReply
from envoy_autoreload.digest import Snapshot
from envoy_autoreload.gatekeeper import Gatekeeper
from envoy_autoreload.logs import log_event
from envoy_autoreload.planner import Planner
from envoy_autoreload.ports import EnvoyFacts, Reactor
from envoy_autoreload.recovery import Recovery
from envoy_autoreload.roster import Generation, Roster
from envoy_autoreload.settings import Settings
from envoy_autoreload.states import ColdStart, Respawn, StartNext, Timer
from envoy_autoreload.triggers import Triggers, runs_already
from envoy_autoreload.validation import PreflightOutcome
from envoy_autoreload.watching import Watching

logger = logging.getLogger(__name__)


class Hooks(Protocol):
    """What the intake needs of the supervisor."""

    def current(self) -> Snapshot | None: ...
    def request_restart(
        self, reason: str, changed: list[str] | None = None, events: int | None = None
    ) -> int: ...
    def status_text(self) -> str: ...


class Intake:
    def __init__(
        self,
        settings: Settings,
        reactor: Reactor,
        roster: Roster,
        batches: Batches,
        planner: Planner,
        gatekeeper: Gatekeeper,
        watching: Watching | None,
        triggers: Triggers,
        recovery: Recovery,
        family: EnvoyFacts,
        hooks: Hooks,
        check_ahead: CheckAhead,
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self._roster = roster
        self._batches = batches
        self._planner = planner
        self._gatekeeper = gatekeeper
        self._watching = watching
        self._triggers = triggers
        self._recovery = recovery
        self._family = family
        self._hooks = hooks
        self._check_ahead = check_ahead

    def absorb_requests(self) -> bool:
        """Requests that arrive while validated content waits to start, and ask for
        exactly that content, join it instead of superseding it: a stream of requests
        faster than validation used to restart nothing at all (REVIEW-core finding 15)."""
        plan = self._planner.plan
        if not isinstance(plan, StartNext) or plan.content is None:
            return False
        current = self._hooks.current()
        if current is None or current.digest != plan.content.digest:
            return False  # the content moved on: the requests go through the gate
        reasons = ",".join(dict.fromkeys([*plan.reason.split(","), *self._batches.queued]))
        self._batches.queued.clear()
        self._batches.seq = self._batches.request_seq
        self._planner.replan(
            StartNext(reasons, self._batches.request_seq, plan.content, plan.config), "absorbed"
        )
        return True

    def take_requests(self, serving: Generation) -> bool:
        """Turn the queued requests into a batch; True when a plan may follow now."""
        if self._requests_change_nothing(serving) or self._requests_held(serving):
            return False
        gate = self._gatekeeper.gate
        if gate.enabled and self._watching is None and self.must_wait_for_drain():
            # Nothing pins what was validated without watching: validate right before
            # the start instead, after the drain wait.
            return False
        reason = self._batches.take()
        if gate.enabled:
            flags = self._family.config_flags(serving)
            content = self._hooks.current()  # events still queued are read first
            self._check_ahead.before_begin(content)
            outcome = self._gatekeeper.begin(reason, self._batches.seq, content, flags)
            if outcome is not None:
                self.on_preflight_done(outcome)
            if gate.busy:
                return False  # the verdict's event carries the plan out
            if isinstance(self._planner.plan, StartNext):
                # Decided at once (a verdict found ready, nothing else to run): the
                # caller goes on to the start in this turn. Signals and exits polled
                # with this event were handled before it (`Reactor.poll`); a trip
                # through the loop cost the start 0.3 ms (issue 16).
                return True
            # Nothing to carry out here; what else is queued is looked at next turn.
            self._reactor.set_timeout(Timer.ADVANCE, 0)
            return False
        self._planner.replan(StartNext(reason, self._batches.seq), "no_gate")
        self._reactor.cancel(Timer.RETRY)
        return True

    def _requests_change_nothing(self, serving: Generation) -> bool:
        """Queued requests that only say "files changed" (or a plain reload), when the
        content is what serves: answered as unchanged, not restarted (a batch requeued
        after a recovery, a push re-run). SIGHUP and forced reloads always restart."""
        # "retry": a failed start's request put back after the serving epoch died.
        if not set(self._batches.queued) <= {"files_changed", "control", "retry"}:
            return False
        if not self._settings.watch or serving.snapshot is None:
            return False
        current = self._hooks.current()
        if current is None or not runs_already(serving.snapshot, current, logging.INFO, serving):
            return False
        self._batches.queued.clear()
        plan = self._planner.plan
        if isinstance(plan, StartNext) and plan.content is not None:
            # A validated restart of content that is gone again (REVIEW-core finding 9):
            # dropped, not carried out later with a false drain_wait_exceeded.
            self._planner.replan(None, "reverted")
            self._reactor.cancel(Timer.RETRY)
            self._reactor.cancel(Timer.DRAIN_WAIT)
            self._planner.drain_wait_over = False
        self._batches.finish(
            "unchanged",
            "files_changed",
            seq=self._batches.request_seq,
            status=self._hooks.status_text(),
            epoch=serving.epoch,
            message="unchanged, already serving",
        )
        return True

    def _requests_held(self, serving: Generation) -> bool:
        """Every request waits while the files are first read (the comparison needs what
        Envoy started from: watch/build.py). File changes wait while a watched path is
        missing (its return is a change of its own); an operator's SIGHUP or reload
        still goes to the gate."""
        if self._watching is not None and self._watching.building:
            return True  # asked again once the hashing is done (Timer.ADVANCE)
        current = self._hooks.current()
        if current is None or not set(self._batches.queued) <= {"files_changed"}:
            return False
        return self.held_while_missing(current, serving.snapshot)

    def changed_since_validated(self, plan: StartNext) -> bool:
        """Never start unvalidated content: a change since validation goes back to the
        gate as a new request."""
        current = self._hooks.current()
        if plan.content is None or current is None:
            return False
        serving = self._roster.serving()
        # A path the serving content has is gone (even if the plan's content lacked it
        # too): Envoy would fail on it, so file changes start nothing until it is back.
        # An operator's SIGHUP or reload has passed the gate on this very content.
        known = serving.snapshot if serving is not None and serving.snapshot else plan.content
        from_files = set(plan.reason.split(",")) <= {"files_changed", "retry"}
        missing = from_files and bool(current.missing) and self.held_while_missing(current, known)
        if current.digest == plan.content.digest and not missing:
            return False
        if missing or self.held_while_missing(current, plan.content):
            self._planner.replan(None, "went_missing")
            message = f"not restarted: {', '.join(self._triggers.missing.reported)} went missing"
            self._batches.finish(
                "refused",
                plan.reason,
                seq=plan.seq,
                error=message,
                status=self._hooks.status_text(),
            )
            return True
        self._planner.replan(None, "changed_since_validated")
        self._hooks.request_restart("files_changed", current.changed_since(plan.content))
        self._reactor.set_timeout(Timer.ADVANCE, 0)
        return True

    def unchanged_reply(self) -> ControlReply | None:
        """`reload` of what already serves, when nothing else is under way, is answered
        at once. The cheap `current()` (events drained first), not a full walk: a walk
        of 100,000 files stalls the loop about a second (REVIEW-core finding 12)."""
        serving = self._roster.serving()
        idle = (
            not self._gatekeeper.gate.busy
            and self._roster.starting() is None
            and not self._batches.queued
            and self._planner.plan is None  # a validated restart waits: the reload joins it
        )
        current = self._hooks.current() if idle else None
        if serving is None or current is None:
            return None
        if not runs_already(serving.snapshot, current, logging.INFO, serving):
            return None
        return ControlReply(True, "unchanged, already serving", serving.epoch)

    def must_wait_for_drain(self) -> bool:
        draining = self._roster.draining()
        wait_s = self._settings.max_drain_wait_s
        if not draining or self._planner.drain_wait_over or wait_s <= 0:
            return False
        if not self._reactor.has_deadline(Timer.DRAIN_WAIT):
            self._reactor.set_timeout(Timer.DRAIN_WAIT, wait_s)
            oldest = draining[0]
            log_event(
                logger,
                logging.INFO,
                "restart.waiting",
                f"waiting for epoch {oldest.epoch} to finish draining (at most "
                f"{wait_s:g} s) so no connection is cut",
                epoch=oldest.epoch,
                pid=oldest.pid,
            )
        return True

    def on_preflight_done(self, outcome: PreflightOutcome) -> None:
        keeper, planner = self._gatekeeper, self._planner
        outcome = keeper.named(outcome)
        serving = self._roster.serving()
        keeper.log_outcome(outcome, serving.epoch if serving else None, serving=serving is not None)
        if serving is None or isinstance(planner.plan, Respawn | ColdStart):
            self._batches.requeue(keeper.reason)  # recovery first; the gate after it
            return
        if not outcome.ok and self._changed_while_validating():
            self._batches.requeue(keeper.reason)
            return
        if not outcome.ok:
            if isinstance(planner.plan, StartNext) and not planner.plan.rollback:
                planner.replan(None, "gate_failed")  # what is on disk now failed
            keeper.refuse(outcome, self._hooks.status_text())
            return
        running = keeper.incompatible_with(outcome.binary, serving)
        if running is not None and outcome.binary is not None:
            self._on_incompatible_binary(outcome, running, serving)
            return
        if outcome.binary is not None:
            keeper.binary = outcome.binary
        if self._watching is not None:
            config = keeper.config.path if keeper.config is not None else None
            # The config that will run, as the gate read it when it began validating:
            # a big one in a child, never here (a 5 MB config takes seconds, issue 16).
            facts = keeper.gate.bootstrap_facts(config)
            if facts is not None:
                self._watching.exclude_envoy_outputs(facts)
        # A request that passed the gate is a new chance: no backoff, no old failures.
        planner.hot_failures = 0
        self._reactor.cancel(Timer.RETRY)
        plan = StartNext(keeper.reason, keeper.seq, keeper.content, keeper.config)
        planner.replan(plan, "gate_passed")

    def _changed_while_validating(self) -> bool:
        """A config deleted and recreated (or rewritten) while Envoy read it: not a
        validation failure of anything anyone pushed (REVIEW-core finding 15)."""
        pinned, current = self._gatekeeper.content, self._hooks.current()
        if pinned is None or current is None or current.digest == pinned.digest:
            return False
        log_event(
            logger,
            logging.INFO,
            "validation.superseded",
            "the files changed while they were validated; validating them again",
        )
        return True

    def _on_incompatible_binary(
        self, outcome: PreflightOutcome, running: str, serving: Generation
    ) -> None:
        binary = outcome.binary
        assert binary is not None
        keeper = self._gatekeeper
        if self._settings.on_incompatible_binary == "refuse":
            plan = self._planner.plan
            if isinstance(plan, StartNext) and not plan.rollback:
                self._planner.replan(None, "gate_failed")  # an older plan is stale too
            keeper.refuse_incompatible(binary, running, serving, self._hooks.status_text())
            return
        keeper.announce_full_restart(binary, running)
        # Every one marked first, then KILLed: the outage is accepted anyway, and TERMs
        # would race (a TERMed child whose parent already went retries for 10 s and
        # aborts, §6), holding epoch 0 back as long (#10902).
        alive = self._roster.alive()
        for gen in alive:
            self._roster.mark_stopping(gen, "replaced by an incompatible binary")
        for gen in reversed(alive):
            self._roster.mark_terminated(gen)
            gen.process.kill()
        cold = ColdStart("incompatible binary", keeper.seq, keeper.content, keeper.config)
        self._planner.replan(cold, "incompatible_binary")

    def on_drain_wait_over(self) -> None:
        """Whatever waits for the drain: a validated plan, or (with a gate and no
        watching) the queued requests themselves, which validate after the wait
        (REVIEW-core finding 2: that wait used to last the whole parent-shutdown time)."""
        if not isinstance(self._planner.plan, StartNext) and not self._batches.queued:
            return  # stale: what waited for the drain is gone
        self._planner.drain_wait_over = True
        for gen in self._roster.draining():
            log_event(
                logger,
                logging.WARNING,
                "restart.drain_wait_exceeded",
                f"restarting although epoch {gen.epoch} still drains: Envoy will end "
                "its drain now and its open connections may be reset",
                epoch=gen.epoch,
                pid=gen.pid,
                config=gen.config_short,
                waited_s=self._settings.max_drain_wait_s,
            )

    def request(
        self, reason: str, changed: list[str] | None = None, events: int | None = None
    ) -> int:
        """Queue a hot restart; any number of queued requests run as one. Returns the
        request's number (answered by the batch that covers it)."""
        seq, first = self._batches.add(reason)
        # A new request is a new chance: earlier failures no longer count against it.
        self._planner.hot_failures = 0
        serving = self._roster.serving()
        log_event(
            logger,
            logging.INFO if first else logging.DEBUG,
            "restart.requested" if first else "restart.coalesced",
            reason=reason,
            epoch=serving.epoch if serving else None,
            pid=serving.pid if serving else None,
            changed=changed[:5] if changed is not None else None,
            count=len(changed) if changed is not None else None,
            events=events,
        )
        return seq

    # -- file changes -----------------------------------------------------------------
    def on_burst_due(self) -> None:
        if self._watching is None:
            return
        burst = self._watching.settle()
        if burst is None:
            return
        serving = self._roster.serving()
        verdict = self._triggers.judge(
            burst,
            self._newest_content(),
            self._roster.last_started_content,
            serving,
            self._config_of(serving),
        )
        if verdict is not None:
            self.request("files_changed", verdict.changed, verdict.events)

    def held_while_missing(self, snapshot: Snapshot, reference: Snapshot | None) -> bool:
        serving = self._roster.serving()
        return self._triggers.held(
            snapshot,
            reference or self._roster.last_started_content,
            serving,
            self._config_of(serving),
        )

    def _newest_content(self) -> Snapshot | None:
        """The content the newest attempt carries: being validated, validated and
        waiting to start, starting, or serving. A failed attempt is none of these."""
        if self._gatekeeper.gate.busy:
            return self._gatekeeper.content
        plan = self._planner.plan
        if isinstance(plan, StartNext) and plan.content is not None:
            return plan.content
        generation = self._roster.starting() or self._roster.serving()
        return generation.snapshot if generation is not None else None

    def _config_of(self, serving: Generation | None) -> Path | None:
        """The -c the serving Envoy runs, when --config does not name it: a missing
        path check needs it (see `MissingPaths.hold`)."""
        if self._settings.config is None and serving is not None:
            return self._family.config_path(serving)
        return None
