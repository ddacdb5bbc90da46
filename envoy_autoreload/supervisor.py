"""The restarter core: which generation to start, when, and what to do when one fails.

Owns every generation and all restart policy; consumes the reactor's events in the main
thread. Facts about the Envoy family (admin address, LIVE, base id, shared memory) come
from `family.py`; how a restart was asked for (a signal, file changes) does not matter
here: every request arrives as `request_restart`.

The rules, each from a measured failure of upstream's hot-restarter.py (ENVOY_FACTS):
- One generation starts at a time (upstream #550); requests that arrive meanwhile are
  queued and any number of them run as one restart. Never more than three processes of
  the family at once: epochs share domain sockets modulo 3 (§0, §4).
- A new generation's epoch is the newest *serving* epoch + 1. A failed start does not
  consume its epoch: the retry reuses it, because Envoy epochs must be consecutive
  (§4, istio #35740). With nothing alive we start over at epoch 0.
- A generation serves only when Envoy says so: `/server_info` over a fresh connection
  reports LIVE at that epoch (§9, §15).
- By default a restart also waits until the previous parent has exited: a third
  process makes Envoy cut the oldest one's drain short and reset its connections
  (§8, §10), bounded by --max-drain-wait.
- A failed start never touches the serving generation (upstream kills everything,
  #4797). The INITIALIZING flag it leaves set is cleared before the next attempt, when
  no child of ours is starting (§3, #726, #33446).
- We never signal a draining generation while its successor lives: the successor would
  abort about 10 s after its parent-shutdown time (§6).

What to start next is one value, `_plan` (a hot retry, a respawn from a draining parent,
or a cold start), never several flags that could disagree.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Final, assert_never

from envoy_autoreload import __version__
from envoy_autoreload.backoff import (
    COLD_BACKOFF_CAP_S,
    COLD_BACKOFF_FIRST_S,
    HOT_RESTART_RETRIES,
    HOT_RETRY_FIRST_S,
    CrashBudget,
    DeathPacing,
    exponential_delay,
)
from envoy_autoreload.child import Generation, GenerationState, describe_exit, spawn
from envoy_autoreload.command import RunningCommand
from envoy_autoreload.control import ControlConnection, ControlDesk, ControlReply, ControlServer
from envoy_autoreload.digest import Snapshot
from envoy_autoreload.errors import BinaryError, ExitCode, SpawnError, ValidationFailed
from envoy_autoreload.family import EnvoyFamily
from envoy_autoreload.gate import Gate
from envoy_autoreload.limits import binding_limit, check_limits
from envoy_autoreload.logs import FieldValue, log_event
from envoy_autoreload.loop import DeadlineReached, Event, FdReady, Reactor, SignalReceived
from envoy_autoreload.settings import Settings
from envoy_autoreload.telemetry import ExitCause, Telemetry
from envoy_autoreload.validation import (
    BinaryInfo,
    PreflightOutcome,
    Verdict,
)
from envoy_autoreload.watch.changes import ChangeDetector
from envoy_autoreload.watch.missing import MissingPaths

logger = logging.getLogger(__name__)
envoy_logger = logging.getLogger("envoy_autoreload.envoy")

KILL_REAP_WAIT_S: Final = 5.0
MAX_QUEUED_REASONS: Final = 8
MAX_FAMILY_PROCESSES: Final = 3
EARLY_DRAIN_MARGIN_S: Final = 0.25
PARENT_DIED: Final = "its parent, the serving epoch, died"
# Exit codes by which a POSIX shell says it could not run a command (the script's own
# mistake, not Envoy's).
SHELL_CANNOT_RUN: Final = {126: "a command in it is not executable", 127: "command not found"}


class Timer(enum.Enum):
    """The supervisor's deadlines; at most one of each is armed."""

    PROBE = "probe"  # ask the starting generation whether it is LIVE yet
    START_DEADLINE = "start_deadline"  # --start-timeout for the starting generation
    RETRY = "retry"  # backoff before the next attempt (hot retry or cold start)
    DRAIN_WAIT = "drain_wait"  # --max-drain-wait for the previous parent to exit
    ORPHAN_KILL = "orphan_kill"  # orphans TERMed so epoch 0 can start get KILLed after it
    TERM_WAIT = "term_wait"  # --term-wait after SIGTERM to every child
    KILL_WAIT = "kill_wait"  # how long SIGKILLed children get to be reaped
    DEBOUNCE = "debounce"  # a burst of file events is due (quiet window or max wait)
    COMMAND_DEADLINE = "command_deadline"  # --validate-timeout for a validation step
    CONTROL_IDLE = "control_idle"  # control clients that never sent a request are dropped
    ADVANCE = "advance"  # a decision made without an event: carried out from the loop


@dataclass(frozen=True, slots=True)
class StartNext:
    """Start the next epoch once pacing allows: the request passed the gate (or there is
    no gate), or it is a retry of one that did (after the RETRY backoff)."""

    reason: str
    seq: int  # the newest request it answers
    content: Snapshot | None = None  # what the gate validated, when watching


@dataclass(frozen=True, slots=True)
class Respawn:
    """Start the dead serving epoch again from its still-draining parent."""

    epoch: int


@dataclass(frozen=True, slots=True)
class ColdStart:
    """Nothing serves: start epoch 0 once the whole family is gone."""

    reason: str
    covers_seq: int = 0  # a validated batch this start carries (a full restart)


Plan = StartNext | Respawn | ColdStart


class SupervisorState(enum.Enum):
    """Derived from the generations and the plan, for status lines; never stored."""

    STARTING = "starting"
    SERVING = "serving"
    VALIDATING = "validating"
    RESTARTING = "restarting"
    RECOVERING = "recovering"
    STOPPING = "stopping"


class Supervisor:
    """Runs generations of the start script and keeps one of them serving."""

    def __init__(
        self,
        settings: Settings,
        reactor: Reactor,
        changes: ChangeDetector | None = None,
        *,
        telemetry: Telemetry | None = None,
        control: ControlServer | None = None,
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self._changes = changes
        self._telemetry = telemetry or Telemetry()
        self._control = control
        # Requests are numbered; a batch answers every request up to its number, so a
        # control-socket `reload` knows which outcome is its own.
        self._request_seq = 0
        self._batch_seq = 0
        self._batch_began_at: float | None = None
        self._preflight_seq = 0
        self._desk = ControlDesk(reactor, Timer.CONTROL_IDLE)
        self._last_failed_seq = 0
        self._last_start_error = ""
        self._status_line: str | None = None
        self._watch_limit = binding_limit("watches").value
        self._family = EnvoyFamily(settings)
        self._generations: list[Generation] = []
        self._requests: list[str] = []
        self._plan: Plan | None = None
        self._hot_failures = 0
        self._cold_failures = 0
        self._drain_wait_over = False
        self._crash_budget = CrashBudget()
        self._death_pacing = DeathPacing()
        self._stopping = False
        self._exit_floor = ExitCode.CLEAN_STOP
        self._exit_code: ExitCode | None = None
        self._warned: set[str] = set()
        self._binary: BinaryInfo | None = None
        self._gate = Gate(settings, reactor, Timer.COMMAND_DEADLINE)
        self._preflight_reason = ""
        self._preflight_content: Snapshot | None = None
        self._abandoned_digest: str | None = None  # content whose restart was given up
        self._cold_attempt_seq = 0  # newest request a cold start has already tried
        self._missing = MissingPaths(changes.roots if changes is not None else ())
        self._last_started_content: Snapshot | None = None
        self._ever_served = False

    # -- public ---------------------------------------------------------------
    def run(self) -> ExitCode:
        """Start epoch 0 and supervise until stopped; always leaves no child behind."""
        try:
            self._check_before_first_start()
            if self._changes is not None:
                self._start_watching(self._changes)
            if self._control is not None:
                self._reactor.add_reader(self._control.fileno(), self._control)
            self._start(0, "startup", first=True)
            while True:
                for event in self._reactor.poll():
                    self._dispatch(event)
                    code = self._exit_code
                    if code is not None:
                        self._publish()
                        return code
                self._publish()
        finally:
            self._gate.abandon()
            self._kill_leftovers()

    @property
    def state(self) -> SupervisorState:
        if self._stopping:
            return SupervisorState.STOPPING
        serving = self._serving()
        starting = self._starting()
        if serving is None:
            return SupervisorState.STARTING if starting else SupervisorState.RECOVERING
        if self._gate.busy:
            return SupervisorState.VALIDATING
        return SupervisorState.RESTARTING if starting else SupervisorState.SERVING

    def request_restart(
        self, reason: str, changed: list[str] | None = None, events: int | None = None
    ) -> int:
        """Queue a hot restart; any number of queued requests run as one. Returns the
        request's number (answered by the batch that covers it)."""
        self._request_seq += 1
        if self._stopping:
            return self._request_seq
        first = not self._requests
        if reason not in self._requests and len(self._requests) < MAX_QUEUED_REASONS:
            self._requests.append(reason)
        # A new request is a new chance: earlier failures no longer count against it.
        self._hot_failures = 0
        serving = self._serving()
        self._event(
            logging.INFO if first else logging.DEBUG,
            "restart.requested" if first else "restart.coalesced",
            reason=reason,
            epoch=serving.epoch if serving else None,
            pid=serving.pid if serving else None,
            changed=changed[:5] if changed is not None else None,
            count=len(changed) if changed is not None else None,
            events=events,
        )
        return self._request_seq

    # -- dispatch -------------------------------------------------------------
    def _dispatch(self, event: Event) -> None:
        match event:
            case SignalReceived(signum=signum):
                self._on_signal(signum)
            case FdReady(key=key):
                if isinstance(key, Generation):
                    self._on_stderr(key)
                elif isinstance(key, ChangeDetector):
                    self._on_watch_readable(key)
                elif isinstance(key, RunningCommand):
                    self._gate.on_output(key)
                elif isinstance(key, ControlServer):
                    self._desk.accept_all(key)
                elif isinstance(key, ControlConnection):
                    self._on_control_request(key)
            case DeadlineReached(key=key):
                if isinstance(key, Timer) and self._reactor.claim(event):
                    self._on_timer(key)
            case _:
                assert_never(event)
        self._advance()

    def _on_signal(self, signum: signal.Signals) -> None:
        match signum:
            case signal.SIGTERM | signal.SIGINT:
                self._begin_stop(f"received {signum.name}", ExitCode.CLEAN_STOP)
            case signal.SIGCHLD:
                self._reap()
            case signal.SIGHUP:
                self.request_restart("SIGHUP")
            case signal.SIGUSR1:
                self._forward(signal.SIGUSR1)
            case _:
                self._event(logging.DEBUG, "signal.ignored", signal=signum.name)

    def _on_timer(self, timer: Timer) -> None:
        match timer:
            case Timer.PROBE:
                self._probe()
            case Timer.START_DEADLINE:
                self._on_start_deadline()
            case Timer.RETRY | Timer.ADVANCE:
                pass  # _advance() runs after every event
            case Timer.DRAIN_WAIT if not isinstance(self._plan, StartNext):
                pass  # stale: what waited for the drain is gone
            case Timer.DRAIN_WAIT:
                self._drain_wait_over = True
                for gen in self._in_state(GenerationState.DRAINING):
                    self._event(
                        logging.WARNING,
                        "restart.drain_wait_exceeded",
                        f"restarting although epoch {gen.epoch} still drains: Envoy will end "
                        "its drain now and its open connections may be reset",
                        epoch=gen.epoch,
                        pid=gen.pid,
                        waited_s=self._settings.max_drain_wait_s,
                    )
            case Timer.ORPHAN_KILL:
                for gen in self._alive():
                    if gen.killed_by_us is not None and gen.state is not GenerationState.STARTING:
                        self._event(
                            logging.WARNING, "child.killing_orphan", epoch=gen.epoch, pid=gen.pid
                        )
                        gen.kill()
            case Timer.TERM_WAIT:
                self._kill_remaining()
            case Timer.KILL_WAIT:
                self._event(
                    logging.ERROR,
                    "shutdown.kill_timeout",
                    "children did not go away after SIGKILL",
                    pids=[g.pid for g in self._alive()],
                )
                self._exit_code = ExitCode.CHILD_KILLED
            case Timer.DEBOUNCE:
                self._on_burst_due()
            case Timer.COMMAND_DEADLINE:
                self._gate.on_deadline()
            case Timer.CONTROL_IDLE:
                self._desk.drop_idle()
            case _:
                assert_never(timer)

    def _on_stderr(self, gen: Generation) -> None:
        on_line = None
        if self._settings.log_format == "json":
            # One JSON object a line, Envoy's own lines included, each with its epoch/pid.
            def on_line(line: str) -> None:
                log_event(
                    envoy_logger, logging.INFO, "envoy.output", line, epoch=gen.epoch, pid=gen.pid
                )

        if not gen.pump_stderr(on_line):
            fd = gen.stderr_fd()
            if fd is not None:
                self._reactor.remove_reader(fd)
            gen.close_stderr()

    # -- watching -------------------------------------------------------------
    def _start_watching(self, changes: ChangeDetector) -> None:
        planned = changes.plan()
        for check in check_limits(planned.watch_points):
            if not check.ok:
                self._event(logging.WARNING, "watch.limit_low", check.advice())
        snapshot = changes.start(degraded_ok=self._settings.watch_degraded)
        if changes.active:
            self._reactor.add_reader(changes.fileno(), changes)
        self._event(
            logging.INFO,
            "watch.started",
            roots=[str(r.path) for r in changes.roots],
            directories=len(snapshot.directories),
            files=len(snapshot.files),
            watches=changes.watch_count,
        )
        for missing in snapshot.missing:
            self._event(
                logging.WARNING,
                "watch.missing",
                "does not exist yet; watching for it to appear",
                path=missing,
            )

    def _on_watch_readable(self, changes: ChangeDetector) -> None:
        self._telemetry.watch_events.inc(changes.on_readable(time.monotonic()))
        deadline = changes.deadline()
        if deadline is not None:
            self._reactor.set_deadline(Timer.DEBOUNCE, deadline)

    def _current_content(self, changes: ChangeDetector) -> Snapshot:
        """What is on disk now; events already in the kernel's queue are read first (and
        start their debounce), so "nothing happened since the last scan" is true."""
        if changes.active:
            self._on_watch_readable(changes)
        return changes.current()

    def _on_burst_due(self) -> None:
        changes = self._changes
        if changes is None:
            return
        burst = changes.settle(time.monotonic())
        if burst is None:
            deadline = changes.deadline()
            if deadline is not None:
                self._reactor.set_deadline(Timer.DEBOUNCE, deadline)
            return
        # Compare with what the newest live attempt carries: a starting generation
        # already has this content, and a failed one is gone.
        reference = self._newest_content()
        if self._held_while_missing(burst.snapshot, reference):
            return
        if self._runs_already(reference, burst.snapshot, logging.DEBUG):
            return
        if burst.snapshot.digest == self._abandoned_digest:
            self._event(
                logging.INFO,
                "restart.skipped",
                "the content whose restart was given up on; change it or send SIGHUP",
                reason="failed_before",
            )
            return
        if reference is not None:
            changed = burst.snapshot.changed_since(reference)
        else:
            changed = sorted(burst.paths)
        self.request_restart("files_changed", changed, burst.events)

    def _held_while_missing(self, snapshot: Snapshot, reference: Snapshot | None) -> bool:
        """A watched path that existed is gone: no restart until it is back."""
        serving = self._serving()
        config = None
        if self._settings.config is None and serving is not None:
            config = self._family.config_path(serving)  # the -c it runs
        return self._missing.hold(
            snapshot,
            reference or self._last_started_content,
            config=config,
            epoch=serving.epoch if serving is not None else None,
            pid=serving.pid if serving is not None else None,
        )

    def _drop_held_batch(self, plan: StartNext) -> None:
        """A validated restart whose files went missing before it started: it is over
        (refused); the files' return is a change like any other."""
        message = f"not restarted: {', '.join(self._missing.reported)} went missing"
        self._batch_began_at = None
        self._telemetry.restart_done(
            "refused", plan.reason, error=message, status=self._status_text()
        )
        self._desk.answer(plan.seq, ControlReply(False, message))

    def _newest_content(self) -> Snapshot | None:
        """The content the newest attempt carries: being validated, validated and
        waiting to start, starting, or serving. A failed attempt is none of these."""
        if self._gate.busy:
            return self._preflight_content
        if isinstance(self._plan, StartNext) and self._plan.content is not None:
            return self._plan.content
        generation = self._starting() or self._serving()
        return generation.snapshot if generation is not None else None

    def _runs_already(self, reference: Snapshot | None, snapshot: Snapshot, level: int) -> bool:
        """True (and logged) when `reference` is exactly this content."""
        if reference is None or snapshot.digest != reference.digest:
            return False
        serving = self._serving()
        self._event(
            level,
            "restart.skipped",
            "unchanged, not restarting",
            reason="unchanged",
            epoch=serving.epoch if serving else None,
            pid=serving.pid if serving else None,
        )
        return True

    # -- what to start next -----------------------------------------------------
    def _advance(self) -> None:
        """Start the next generation if one is wanted and allowed now."""
        if self._stopping or self._exit_code is not None or self._starting() is not None:
            return
        serving = self._serving()
        if serving is None:
            self._recover(backing_off=self._reactor.has_deadline(Timer.RETRY))
            return
        if serving.killed_by_us is not None or self._gate.busy:
            return  # a full restart is under way, or requests wait for the gate, as one
        if self._requests:
            if self._requests_change_nothing(serving):
                return
            if self._gate.enabled and self._changes is None and self._must_wait_for_drain():
                # Nothing pins what was validated without watching: validate right before
                # the start instead, after the drain wait.
                return
            reason = ",".join(self._requests)
            self._requests.clear()
            self._begin_batch(reason)
            if self._gate.enabled:
                self._begin_preflight(reason)
                if not self._gate.busy:
                    # Decided at once (nothing had to run: a known binary, no config to
                    # validate): no event will follow to carry the plan out. Back through
                    # the loop, not recursion: signals and exits come first.
                    self._reactor.set_timeout(Timer.ADVANCE, 0)
                return
            self._plan = StartNext(reason, self._batch_seq)
            self._reactor.cancel(Timer.RETRY)
        plan = self._plan
        if not isinstance(plan, StartNext):
            self._reactor.cancel(Timer.DRAIN_WAIT)
            self._drain_wait_over = False
            return
        if self._reactor.has_deadline(Timer.RETRY):
            return  # a retry waits out its backoff
        if plan.content is not None and self._changes is not None:
            current = self._current_content(self._changes)
            if current.digest != plan.content.digest:
                # Changed since it was validated: never start unvalidated content.
                self._plan = None
                if self._held_while_missing(current, plan.content):
                    self._drop_held_batch(plan)
                    return
                self.request_restart("files_changed", current.changed_since(plan.content))
                self._reactor.set_timeout(Timer.ADVANCE, 0)
                return
        if serving.doomed:
            # Its parent died early: a hot restart from it would hang (measured). The
            # validated request is carried out as a stop and a cold start instead.
            self._full_restart(serving, plan)
            return
        if len(self._alive()) >= MAX_FAMILY_PROCESSES:
            return  # a cut drain is ending; its exit wakes us again
        if self._must_wait_for_drain():
            return
        reason, seq = plan.reason, plan.seq
        self._plan = None
        self._drain_wait_over = False
        for draining in self._in_state(GenerationState.DRAINING):
            # A third process makes the serving one end this drain at once (§8).
            draining.drain_cut_by_restart = True
        self._reactor.cancel(Timer.RETRY)
        self._reactor.cancel(Timer.DRAIN_WAIT)
        self._start(serving.epoch + 1, reason, parent=serving, covers_seq=seq, content=plan.content)

    def _requests_change_nothing(self, serving: Generation) -> bool:
        """Queued requests that only say "files changed" (or a plain reload), when the
        content is what serves: answered as unchanged, not restarted (a batch requeued
        after a recovery, a push re-run). SIGHUP and forced reloads always restart."""
        changes = self._changes
        if not set(self._requests) <= {"files_changed", "control"}:
            return False
        if changes is None or not self._settings.watch or serving.snapshot is None:
            return False
        if not self._runs_already(serving.snapshot, self._current_content(changes), logging.INFO):
            return False
        self._requests.clear()
        self._desk.answer(
            self._request_seq, ControlReply(True, "unchanged, already serving", serving.epoch)
        )
        return True

    def _begin_batch(self, reason: str) -> None:
        self._batch_seq = self._request_seq
        self._batch_began_at = time.monotonic()
        self._telemetry.restart_began(reason, f"reloading: {reason}")

    def _must_wait_for_drain(self) -> bool:
        draining = self._in_state(GenerationState.DRAINING)
        if not draining or self._drain_wait_over or self._settings.max_drain_wait_s <= 0:
            return False
        if not self._reactor.has_deadline(Timer.DRAIN_WAIT):
            self._reactor.set_timeout(Timer.DRAIN_WAIT, self._settings.max_drain_wait_s)
            oldest = draining[0]
            self._event(
                logging.INFO,
                "restart.waiting",
                f"waiting for epoch {oldest.epoch} to finish draining (at most "
                f"{self._settings.max_drain_wait_s:g} s) so no connection is cut",
                epoch=oldest.epoch,
                pid=oldest.pid,
            )
        return True

    def _recover(self, backing_off: bool) -> None:
        """Nothing serves: respawn from a draining parent if one is there, else epoch 0."""
        plan = self._plan
        if isinstance(plan, Respawn):
            parents = self._in_state(GenerationState.DRAINING)
            if parents:
                # Measured: the dead epoch's parent refuses new connections and nobody
                # will tell it to exit; the same epoch started again from it goes LIVE
                # in ~0.1 s and ends its drain normally.
                self._plan = None
                # Answers no reload: the dead epoch's own batch was answered when it went
                # LIVE, and requests since then still need the gate.
                self._start(plan.epoch, "recovery", parent=parents[-1])
                return
            plan = self._plan = ColdStart("recovery")
        if not isinstance(plan, ColdStart):
            if plan is None and not self._requests:
                return
            # Nothing serves: whatever else was planned, recovery comes first.
            plan = self._plan = ColdStart("recovery")
        orphans = self._alive()
        if orphans:
            # Epoch 0 cannot bind its domain socket while any of the family lives
            # (#10902); a draining parent without a successor serves nothing.
            self._stop_orphans(orphans)
            return
        # A request newer than the last cold attempt (an operator's SIGHUP, a fixed
        # config) skips the backoff once; queued requests are not consumed: they pass
        # the gate once something serves.
        fresh_request = self._request_seq > self._cold_attempt_seq
        if backing_off and not fresh_request:
            return
        self._cold_attempt_seq = self._request_seq
        self._plan = None
        self._reactor.cancel(Timer.RETRY)
        self._start(0, plan.reason, covers_seq=plan.covers_seq)

    def _requeue(self, reason: str) -> None:
        for part in reason.split(","):
            if part and part not in ("startup", "recovery") and part not in self._requests:
                self._requests.append(part)

    def _stop_orphans(self, orphans: list[Generation]) -> None:
        for orphan in orphans:
            if orphan.killed_by_us is None:
                orphan.killed_by_us = "no successor serves; stopped so epoch 0 can start"
                self._event(
                    logging.WARNING,
                    "child.stopping_orphan",
                    orphan.killed_by_us,
                    epoch=orphan.epoch,
                    pid=orphan.pid,
                )
                # A hung orphan (§7) would block epoch 0 for ever: KILLed in time.
                self._terminate(orphan)

    def _full_restart(self, serving: Generation, plan: StartNext) -> None:
        """A doomed epoch cannot hot restart (its child hangs, measured); stop it and
        cold-start epoch 0 with the validated request: the ~0.1 s outage its abort would
        cause anyway, at a moment of the operator's choosing."""
        serving.killed_by_us = "full restart: its parent died early, so it cannot hot restart"
        self._event(
            logging.WARNING,
            "restart.full",
            f"{serving.killed_by_us}; stopping it and starting epoch 0 (a short outage)",
            epoch=serving.epoch,
            pid=serving.pid,
        )
        self._plan = ColdStart(plan.reason, covers_seq=plan.seq)
        self._terminate(serving)

    def _terminate(self, gen: Generation) -> None:
        """TERM one we decided to stop; KILL it after --term-wait if it hangs (§7)."""
        gen.send_signal(signal.SIGTERM)
        if not self._reactor.has_deadline(Timer.ORPHAN_KILL):
            self._reactor.set_timeout(Timer.ORPHAN_KILL, self._settings.term_wait_s)

    # -- the gate: binary checks and validation ----------------------------------
    def _check_before_first_start(self) -> None:
        """Start-up: refuse to start Envoy on a binary that is not Envoy or a config that
        does not validate (blocking is fine: the loop is not running yet)."""
        if not self._gate.enabled:
            return
        outcome = self._gate.check_now()
        self._log_outcome(outcome, epoch=0)
        match outcome.verdict:
            case Verdict.PASSED:
                self._binary = outcome.binary
            case Verdict.BINARY_REFUSED:
                raise BinaryError(outcome.message)
            case Verdict.FAILED:
                raise ValidationFailed(
                    f"the config {self._settings.config} does not validate, so Envoy is not "
                    f"started: {outcome.message.removeprefix('validation failed: ')}"
                )

    def _begin_preflight(self, reason: str) -> None:
        self._preflight_reason = reason
        self._preflight_seq = self._batch_seq
        # Pinned before validating: what starts must be what was validated (see _advance).
        self._preflight_content = (
            self._current_content(self._changes) if self._changes is not None else None
        )
        outcome = self._gate.begin(self._binary)
        if outcome is not None:
            self._on_preflight_done(outcome)

    def _on_preflight_done(self, outcome: PreflightOutcome) -> None:
        serving = self._serving()
        self._log_outcome(outcome, epoch=serving.epoch if serving else None)
        reason = self._preflight_reason
        if serving is None or isinstance(self._plan, Respawn | ColdStart):
            self._requeue(reason)  # recovery first; the request passes the gate after it
            return
        if not outcome.ok:
            self._batch_began_at = None
            if isinstance(self._plan, StartNext):
                self._plan = None  # what is on disk now failed: never start it
            refused = outcome.verdict is Verdict.BINARY_REFUSED
            self._telemetry.restart_done(
                "refused" if refused else "validation_failed",
                reason,
                error=outcome.message,
                status=self._status_text(),
            )
            self._desk.answer(self._preflight_seq, ControlReply(False, outcome.message))
            return
        binary = outcome.binary
        running = serving.binary if serving is not None and serving.binary else self._binary
        running_version = (running.hot_restart_version if running else None) or (
            self._family.hot_restart_version
        )
        if binary is not None and running_version and binary.hot_restart_version != running_version:
            self._on_incompatible_binary(binary, running_version, reason)
            return
        if binary is not None:
            self._binary = binary
        # A request that passed the gate is a new chance: no backoff, no old failures.
        self._hot_failures = 0
        self._reactor.cancel(Timer.RETRY)
        self._plan = StartNext(reason, self._preflight_seq, self._preflight_content)

    def _on_incompatible_binary(
        self, binary: BinaryInfo, running_version: str, reason: str
    ) -> None:
        what = (
            f"{binary.path} ({binary.release}) has hot-restart version "
            f"{binary.hot_restart_version}, the running Envoy {running_version}: a hot "
            "restart into it cannot work (its shared memory differs, #14224)"
        )
        serving = self._serving()
        if self._settings.on_incompatible_binary == "refuse":
            self._event(
                logging.ERROR,
                "binary.incompatible",
                f"{what}; keeping the running Envoy. To switch, restart the service (a full "
                "stop and start), or run with --on-incompatible-binary=restart",
                epoch=serving.epoch if serving else None,
                pid=serving.pid if serving else None,
                version=binary.release,
                hot_restart_version=binary.hot_restart_version,
            )
            self._batch_began_at = None
            self._telemetry.restart_done("refused", reason, error=what, status=self._status_text())
            self._desk.answer(self._preflight_seq, ControlReply(False, f"refused: {what}"))
            return
        self._event(
            logging.WARNING,
            "restart.full",
            f"{what}; --on-incompatible-binary=restart: stopping every epoch and starting "
            "epoch 0 on it, accepting an outage until it is LIVE",
            version=binary.release,
            hot_restart_version=binary.hot_restart_version,
        )
        self._binary = binary
        for gen in self._alive():
            gen.killed_by_us = "replaced by an incompatible binary"
            self._terminate(gen)
        self._plan = ColdStart("incompatible binary", covers_seq=self._preflight_seq)

    def _log_outcome(self, outcome: PreflightOutcome, epoch: int | None) -> None:
        binary = outcome.binary
        if outcome.ok:
            self._event(
                logging.INFO,
                Verdict.PASSED.value,
                epoch=epoch,
                duration_s=outcome.duration_s,
                version=binary.release if binary else None,
                hot_restart_version=binary.hot_restart_version if binary else None,
            )
            return
        self._event(
            logging.ERROR,
            outcome.verdict.value,
            outcome.message
            + (f"; epoch {epoch} keeps serving" if epoch is not None and self._serving() else ""),
            detail=outcome.detail,
            epoch=epoch,
            duration_s=outcome.duration_s,
        )

    # -- starting -------------------------------------------------------------
    def _start(
        self,
        epoch: int,
        reason: str,
        *,
        parent: Generation | None = None,
        first: bool = False,
        covers_seq: int = 0,
        content: Snapshot | None = None,
    ) -> None:
        assert self._starting() is None, "never two starting generations (upstream #550)"
        if parent is not None:
            # No child of ours is starting, so a set flag can only be a dead child's.
            self._family.restore_flag(parent, epoch)
        try:
            gen = spawn(self._settings.start_script, self._settings.script_args, epoch, reason)
        except OSError as err:
            message = f"cannot execute start script {self._settings.start_script}: {err.strerror}"
            if first:
                raise SpawnError(message) from err
            serving = self._serving()
            self._event(
                logging.ERROR,
                "restart.failed",
                message + (f"; epoch {serving.epoch} keeps serving" if serving else ""),
                epoch=epoch,
                cause="exec failed",
            )
            self._last_failed_seq = covers_seq
            self._last_start_error = message
            self._telemetry.restart_done(
                "start_failed", reason, error=message, status=self._status_text()
            )
            self._after_failed_start(epoch, "exec failed", content)
            return
        if self._changes is not None:
            # What this epoch starts from; a burst that settles later and finds the
            # same content then restarts nothing. Cheap: unchanged files are not read.
            gen.snapshot = content if content is not None else self._current_content(self._changes)
            self._last_started_content = gen.snapshot
        gen.binary = self._binary
        gen.covers_seq = covers_seq
        self._generations.append(gen)
        fd = gen.stderr_fd()
        if fd is not None:
            self._reactor.add_reader(fd, gen)
        self._reactor.set_timeout(Timer.START_DEADLINE, self._settings.start_timeout_s)
        self._reactor.set_timeout(Timer.PROBE, 0.01)
        self._event(logging.INFO, "child.started", epoch=epoch, pid=gen.pid, reason=reason)

    def _probe(self) -> None:
        gen = self._starting()
        if gen is None:
            return
        self._family.observe(gen)
        if gen.envoy is not None and gen.envoy.pid != gen.pid:
            self._warn_once(
                "start_script.no_exec",
                "the start script runs Envoy as a child instead of exec'ing it: signals "
                "reach the shell, not Envoy; end the script with "
                '`exec envoy ... --restart-epoch "$RESTART_EPOCH"`',
                epoch=gen.epoch,
                pid=gen.pid,
            )
        if self._family.is_live(gen):
            self._on_live(gen)
            return
        elapsed = time.monotonic() - gen.started_at
        self._reactor.set_timeout(Timer.PROBE, min(0.1, max(0.01, elapsed / 4)))

    def _on_live(self, gen: Generation) -> None:
        now = time.monotonic()
        self._reactor.cancel(Timer.PROBE)
        self._reactor.cancel(Timer.START_DEADLINE)
        for old in self._in_state(GenerationState.SERVING):
            old.transition(GenerationState.DRAINING)
            self._event(
                logging.INFO,
                "child.draining",
                f"epoch {old.epoch} drains; Envoy ends it after its parent-shutdown time",
                epoch=old.epoch,
                pid=old.pid,
                successor_epoch=gen.epoch,
            )
        for parent in self._in_state(GenerationState.DRAINING):
            if parent.epoch == gen.epoch - 1:
                # Envoy ends the parent's drain at the child's real LIVE + parent-shutdown
                # time; the child's spawn is a lower bound we know for sure.
                parent.draining_since = gen.started_at
        gen.transition(GenerationState.SERVING)
        gen.serving_at = now
        self._ever_served = True
        self._abandoned_digest = None
        self._hot_failures = 0
        self._cold_failures = 0
        self._event(
            logging.INFO,
            "child.serving",
            epoch=gen.epoch,
            pid=gen.pid,
            startup_s=round(now - gen.started_at, 3),
            reason=gen.reason,
        )
        if gen.covers_seq and self._batch_began_at is not None:
            self._telemetry.restart_done(
                "success",
                gen.reason,
                duration_s=now - self._batch_began_at,
                status=self._status_text(),
            )
            self._batch_began_at = None
        else:
            self._telemetry.serving_again(self._status_text())
        self._desk.answer(gen.covers_seq, ControlReply(True, f"serving ({gen.reason})", gen.epoch))

    def _on_start_deadline(self) -> None:
        gen = self._starting()
        if gen is None:
            return
        gen.killed_by_us = f"not LIVE within --start-timeout {self._settings.start_timeout_s:g} s"
        self._event(
            logging.WARNING, "child.start_timeout", gen.killed_by_us, epoch=gen.epoch, pid=gen.pid
        )
        # A child can wait forever on an unresponsive parent (§7); kill it, never the parent.
        gen.kill()

    # -- exits ----------------------------------------------------------------
    def _reap(self) -> None:
        for gen in self._alive():
            if gen.poll() is not None:
                self._on_exited(gen)
        outcome = self._gate.poll()
        if outcome is not None:
            self._on_preflight_done(outcome)

    def _on_exited(self, gen: Generation) -> None:
        self._on_stderr(gen)
        previous = gen.transition(GenerationState.EXITED)
        self._generations.remove(gen)
        self._family.forget(gen)
        assert gen.returncode is not None
        status = describe_exit(gen.returncode)
        self._telemetry.child_exited(_exit_cause(previous, gen, stopping=self._stopping))
        if self._stopping:
            self._event(logging.INFO, "child.exited", epoch=gen.epoch, pid=gen.pid, status=status)
            self._finish_stop_if_done()
            return
        match previous:
            case GenerationState.STARTING:
                self._on_start_failed(gen, gen.killed_by_us or status)
            case GenerationState.SERVING:
                self._on_serving_died(gen, status)
            case GenerationState.DRAINING:
                self._on_drained(gen, status)
            case GenerationState.EXITED:
                raise AssertionError("an exited generation cannot exit again")
            case _:
                assert_never(previous)

    def _on_start_failed(self, gen: Generation, cause: str) -> None:
        self._reactor.cancel(Timer.PROBE)
        self._reactor.cancel(Timer.START_DEADLINE)
        shell_says = SHELL_CANNOT_RUN.get(gen.returncode or 0)
        if shell_says is not None and not self._ever_served:
            # The script's own mistake (a wrong Envoy path), not Envoy's: no retry will
            # fix it, so start-up fails at once. Once something served, it is a failed
            # start like any other and the serving epoch keeps serving.
            raise SpawnError(
                f"the start script {self._settings.start_script} exited {gen.returncode} "
                f"({shell_says}) before Envoy ran: {gen.last_error_line() or 'no output'}"
            )
        serving = self._serving()
        self._event(
            logging.INFO if cause == PARENT_DIED else logging.ERROR,
            "restart.failed",
            f"epoch {gen.epoch} failed to start: {gen.last_error_line() or cause}"
            + (f"; epoch {serving.epoch} keeps serving" if serving else ""),
            detail="\n".join(gen.stderr_tail) or None,
            epoch=gen.epoch,
            pid=gen.pid,
            cause=cause,
        )
        self._last_failed_seq = gen.covers_seq
        self._last_start_error = (
            f"epoch {gen.epoch} failed to start: {gen.last_error_line() or cause}"
        )
        if cause != PARENT_DIED:
            self._telemetry.restart_done(
                "start_failed", gen.reason, error=self._last_start_error, status=self._status_text()
            )
        self._after_failed_start(gen.epoch, cause, gen.snapshot)

    def _after_failed_start(self, epoch: int, cause: str, content: Snapshot | None) -> None:
        if cause == PARENT_DIED:
            return  # the recovery from its parent's death is already planned
        if self._settings.exit_on_child_failure:
            self._begin_stop(
                "a child failed and --exit-on-child-failure is set", ExitCode.CHILD_KILLED
            )
            return
        if self._serving() is None:
            respawn_failed = bool(self._in_state(GenerationState.DRAINING))
            self._on_outage_failure(f"epoch {epoch} failed to start", immediate=respawn_failed)
            return
        self._hot_failures += 1
        if self._hot_failures > HOT_RESTART_RETRIES:
            self._event(
                logging.WARNING,
                "restart.abandoned",
                f"epoch {epoch} failed {self._hot_failures} times; keeping the serving epoch "
                "until the next change or SIGHUP",
                epoch=epoch,
            )
            self._hot_failures = 0
            self._plan = None
            self._batch_began_at = None
            # The same content again (a push re-run) is not a new chance; a change is.
            self._abandoned_digest = content.digest if content is not None else None
            self._telemetry.restart_done(
                "abandoned", "retry", error=self._last_start_error, status=self._status_text()
            )
            self._desk.answer(self._last_failed_seq, ControlReply(False, self._last_start_error))
            return
        delay = exponential_delay(self._hot_failures, HOT_RETRY_FIRST_S, COLD_BACKOFF_CAP_S)
        self._plan = StartNext("retry", self._last_failed_seq, content)
        self._reactor.set_timeout(Timer.RETRY, delay)
        self._event(
            logging.INFO,
            "restart.retry_scheduled",
            epoch=epoch,
            attempt=self._hot_failures + 1,
            in_s=delay,
        )

    def _on_serving_died(self, gen: Generation, status: str) -> None:
        planned = gen.killed_by_us is not None
        self._event(
            logging.INFO if planned else logging.ERROR,
            "child.died",
            f"the serving Envoy exited ({status}): {gen.killed_by_us}"
            if planned
            else f"the serving Envoy died ({status}); nothing serves until a new epoch is LIVE",
            detail=None if planned else "\n".join(gen.stderr_tail) or None,
            epoch=gen.epoch,
            pid=gen.pid,
            status=status,
        )
        self._reactor.cancel(Timer.RETRY)
        self._hot_failures = 0
        if planned:
            if not isinstance(self._plan, ColdStart):
                self._plan = ColdStart(f"full restart ({gen.killed_by_us})")
            return
        # A batch the dead epoch was about to take (being validated, or validated and
        # waiting, or starting) goes back in the queue: it passes the gate and is
        # answered once something serves again. Nothing is dropped silently.
        if self._gate.busy:
            self._gate.abandon()
            self._requeue(self._preflight_reason)
        if isinstance(self._plan, StartNext):
            self._requeue(self._plan.reason)
        self._plan = None
        if self._settings.exit_on_child_failure:
            self._begin_stop(
                "the serving child died and --exit-on-child-failure is set", ExitCode.CHILD_KILLED
            )
            return
        starting = self._starting()
        if starting is not None:
            # Its parent is gone: it would hang or abort (§5, measured), never serve.
            starting.killed_by_us = PARENT_DIED
            starting.kill()
            self._requeue(starting.reason)
        parents = self._in_state(GenerationState.DRAINING)
        if parents and not gen.doomed and parents[-1].epoch == gen.epoch - 1:
            self._plan = Respawn(gen.epoch)
        served_s = time.monotonic() - (gen.serving_at or gen.started_at)
        self._on_outage_failure(f"serving epoch {gen.epoch} died", served_s=served_s)

    def _on_drained(self, gen: Generation, status: str) -> None:
        successor = self._serving()
        if successor is not None and self._died_early(gen, successor):
            # Measured: the successor aborts ~10 s after its parent-shutdown time
            # (sooner when that is >= 5 s), and a hot restart from it hangs for ever
            # with the flag stuck. So no hot restart: epoch 0 at the next request, or
            # the moment it dies.
            successor.doomed = True
            self._event(
                logging.ERROR,
                "child.drain_cut",
                f"draining epoch {gen.epoch} died ({status}) before Envoy ended it; serving "
                f"epoch {successor.epoch} will abort about 10 s after its parent-shutdown "
                "time (ENVOY_FACTS §6) and cannot hot restart; epoch 0 is cold-started at "
                "the next restart request or the moment it dies",
                epoch=gen.epoch,
                pid=gen.pid,
                status=status,
                serving_epoch=successor.epoch,
                serving_pid=successor.pid,
            )
            return
        self._event(
            logging.INFO,
            "child.exited",
            gen.killed_by_us
            or (
                "drain cut short by a newer epoch" if gen.drain_cut_by_restart else "drain finished"
            ),
            epoch=gen.epoch,
            pid=gen.pid,
            status=status,
        )

    def _died_early(self, gen: Generation, successor: Generation) -> bool:
        """Before Envoy would have ended it; unknown timing never counts as early."""
        if gen.drain_cut_by_restart or gen.draining_since is None:
            return False
        shutdown_s = self._family.parent_shutdown_s(successor)
        if shutdown_s is None:
            return False
        return time.monotonic() < gen.draining_since + shutdown_s - EARLY_DRAIN_MARGIN_S

    def _on_outage_failure(
        self, what: str, *, immediate: bool = False, served_s: float | None = None
    ) -> None:
        """Nothing serves: count it against the crash budget and plan the recovery.

        A death (`served_s`: how long the dead Envoy served) is paced by `DeathPacing`: at
        once, unless it is a crash loop. A respawn from a draining parent is never
        delayed (the parent stops serving new connections once its child died);
        `immediate` when that respawn failed and epoch 0 is the other way to try.
        Consecutive failed cold starts back off 1 s doubling to 30 s.
        """
        now = time.monotonic()
        if self._crash_budget.record(now):
            self._event(
                logging.ERROR,
                "daemon.crash_budget_exhausted",
                f"{self._crash_budget.max_failures} failures within "
                f"{self._crash_budget.window_s:g} s ({what}); exiting so the process "
                "manager can take over",
            )
            self._begin_stop("crash budget exhausted", ExitCode.CHILD_KILLED)
            return
        if not isinstance(self._plan, Respawn):
            self._plan = ColdStart("recovery")
        epoch = self._plan.epoch if isinstance(self._plan, Respawn) else 0
        if served_s is not None:
            delay = self._death_pacing.delay_after(served_s, now)
            if isinstance(self._plan, Respawn):
                delay = 0.0
        elif immediate:
            delay = 0.0
        else:
            self._cold_failures += 1
            delay = exponential_delay(self._cold_failures, COLD_BACKOFF_FIRST_S, COLD_BACKOFF_CAP_S)
        if delay:
            self._reactor.set_timeout(Timer.RETRY, delay)
        self._event(logging.INFO, "restart.recovery_scheduled", what, epoch=epoch, in_s=delay)

    # -- stopping -------------------------------------------------------------
    def _begin_stop(self, reason: str, floor: ExitCode) -> None:
        if self._stopping:
            self._event(logging.INFO, "shutdown.already_stopping", reason)
            return
        self._stopping = True
        self._exit_floor = max(self._exit_floor, floor)
        for timer in Timer:
            self._reactor.cancel(timer)
        self._gate.abandon()
        alive = self._alive()
        self._telemetry.stopping(f"stopping: {reason}")
        self._desk.answer(
            self._request_seq, ControlReply(False, f"the daemon is stopping ({reason})")
        )
        if self._control is not None:
            self._reactor.remove_reader(self._control.fileno())
        self._event(
            logging.INFO,
            "shutdown.started",
            reason,
            epochs=[g.epoch for g in alive],
            pids=[g.pid for g in alive],
            term_wait_s=self._settings.term_wait_s,
        )
        for gen in alive:
            gen.send_signal(signal.SIGTERM)
        if alive:
            self._reactor.set_timeout(Timer.TERM_WAIT, self._settings.term_wait_s)
        self._finish_stop_if_done()

    def _kill_remaining(self) -> None:
        alive = self._alive()
        for gen in alive:
            self._event(
                logging.WARNING,
                "shutdown.killing",
                f"still alive {self._settings.term_wait_s:g} s after SIGTERM; sending SIGKILL",
                epoch=gen.epoch,
                pid=gen.pid,
            )
            gen.kill()
        if alive:
            self._exit_floor = ExitCode.CHILD_KILLED
            self._reactor.set_timeout(Timer.KILL_WAIT, KILL_REAP_WAIT_S)

    def _finish_stop_if_done(self) -> None:
        if self._stopping and not self._alive():
            self._reactor.cancel(Timer.TERM_WAIT)
            self._reactor.cancel(Timer.KILL_WAIT)
            self._exit_code = self._exit_floor
            self._family.remove_shared_memory()
            self._event(logging.INFO, "shutdown.finished", exit_code=int(self._exit_code))

    def _kill_leftovers(self) -> None:
        """Last resort on the way out (a bug raised): no child outlives the daemon."""
        for gen in self._alive():
            gen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                gen.process.wait(timeout=KILL_REAP_WAIT_S)
            gen.close_stderr()

    # -- control socket and status -------------------------------------------
    def _on_control_request(self, conn: ControlConnection) -> None:
        request = self._desk.read(conn)
        if request is None:
            return
        match request.split():
            case ["status"]:
                conn.reply(ControlReply(True, self.state.value, status=dict(self._status())))
            case ["reload", *flags] if set(flags) <= {"--force"}:
                self._control_reload(conn, force=bool(flags))
            case []:
                conn.close()
            case _:
                conn.reply(ControlReply(False, f"unknown request {request!r}: reload, status"))

    def _control_reload(self, conn: ControlConnection, *, force: bool) -> None:
        if self._stopping:
            conn.reply(ControlReply(False, "the daemon is stopping"))
            return
        serving = self._serving()
        idle = not self._gate.busy and self._starting() is None and not self._requests
        if (
            not force
            and idle
            and serving is not None
            and self._changes is not None
            and self._runs_already(serving.snapshot, self._changes.rescan(), logging.INFO)
        ):
            conn.reply(ControlReply(True, "unchanged, already serving", serving.epoch))
            return
        self._desk.wait(self.request_restart("control --force" if force else "control"), conn)

    def _status(self) -> dict[str, object]:
        def brief(gen: Generation | None) -> dict[str, int] | None:
            return {"epoch": gen.epoch, "pid": gen.pid} if gen is not None else None

        changes = self._changes
        snapshot = changes.snapshot if changes is not None else None
        binary = self._binary
        return {
            "state": self.state.value,
            "serving": brief(self._serving()),
            "draining": [brief(g) for g in self._in_state(GenerationState.DRAINING)],
            "starting": brief(self._starting()),
            "last_restart": self._telemetry.last_restart_dict(),
            "last_validation_error": self._telemetry.last_validation_error,
            "watched": {"directories": len(snapshot.directories), "files": len(snapshot.files)}
            if snapshot is not None
            else None,
            "inotify": {"used": changes.watch_count, "limit": self._watch_limit}
            if changes is not None
            else None,
            "envoy": {
                "version": binary.release if binary else self._family.envoy_version,
                "hot_restart_version": binary.hot_restart_version
                if binary
                else self._family.hot_restart_version,
            },
            "daemon": {"pid": os.getpid(), "version": __version__},
        }

    def _status_text(self) -> str:
        """The short line systemd shows (STATUS=): what serves, what drains, what happened."""
        serving = self._serving()
        if self._stopping:
            alive = self._alive()
            return "stopping" + (
                f": waiting for pids {', '.join(str(g.pid) for g in alive)}" if alive else ""
            )
        parts = [
            f"epoch {serving.epoch} serving (pid {serving.pid})" if serving else self.state.value
        ]
        draining = self._in_state(GenerationState.DRAINING)
        if draining:
            parts.append("draining " + ", ".join(f"{g.epoch} (pid {g.pid})" for g in draining))
        last = self._telemetry.last_restart
        if last is not None:
            parts.append(f"last restart: {last.outcome} ({last.reason})")
        return "; ".join(parts)

    def _publish(self) -> None:
        serving = self._serving()
        self._telemetry.epoch.set(serving.epoch if serving else -1)
        self._telemetry.generations_alive.set(len(self._alive()))
        line = self._status_text()
        self._telemetry.publish(self._status(), line if line != self._status_line else None)
        self._status_line = line

    # -- helpers --------------------------------------------------------------
    def _forward(self, signum: signal.Signals) -> None:
        # Not to a starting child: before Envoy installs its handlers, SIGUSR1's default
        # action would kill it (and a shell that did not exec dies of it, §11).
        targets = [g for g in self._alive() if g.state is not GenerationState.STARTING]
        for gen in targets:
            gen.signal_envoy(signum)
        self._event(
            logging.INFO,
            "signal.forwarded",
            signal=signum.name,
            epochs=[g.epoch for g in targets],
            pids=[g.pid for g in targets],
        )

    def _warn_once(self, event: str, message: str, epoch: int, pid: int) -> None:
        if event not in self._warned:
            self._warned.add(event)
            self._event(logging.WARNING, event, message, epoch=epoch, pid=pid)

    def _alive(self) -> list[Generation]:
        return [g for g in self._generations if g.is_alive()]

    def _in_state(self, state: GenerationState) -> list[Generation]:
        return [g for g in self._generations if g.state is state]

    def _serving(self) -> Generation | None:
        serving = self._in_state(GenerationState.SERVING)
        return serving[-1] if serving else None

    def _starting(self) -> Generation | None:
        starting = self._in_state(GenerationState.STARTING)
        return starting[-1] if starting else None

    @staticmethod
    def _event(
        level: int,
        event: str,
        message: str = "",
        *,
        detail: str | None = None,
        **fields: FieldValue,
    ) -> None:
        log_event(logger, level, event, message, detail=detail, **fields)


def _exit_cause(previous: GenerationState, gen: Generation, *, stopping: bool) -> ExitCause:
    if stopping:
        return "stopped"
    match previous:
        case GenerationState.STARTING:
            return "start_failed"
        case GenerationState.SERVING:
            return "replaced" if gen.killed_by_us else "died"
        case _:
            return "drained"


def run(
    settings: Settings,
    changes: ChangeDetector | None = None,
    *,
    telemetry: Telemetry | None = None,
    control: ControlServer | None = None,
) -> ExitCode:
    """Supervise until stopped; the reactor's signal handlers live exactly this long."""
    with Reactor() as reactor:
        try:
            return Supervisor(
                settings, reactor, changes, telemetry=telemetry, control=control
            ).run()
        finally:
            if changes is not None:
                changes.close()
