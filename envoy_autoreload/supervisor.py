"""The restarter core's decisions: which generation to start, when, and what an exit means.

Read `states.py` first: it holds every state, every allowed move and every deadline. This
module decides; `roster.py` records the generations, `batches.py` answers requests,
`triggers.py` turns file changes into requests, `shutdown.py` stops, `status.py` shows.
The world (processes, Envoy's admin and shared memory, helper commands, the watched
files, the clock) is reached only through `ports.py`, so the simulation in
`tests/simulation/` runs this very code against a modelled Envoy.

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
- No exception while handling an event ends the daemon or touches Envoy (DESIGN-core
  §4): it is logged once as `daemon.internal_error`, counted, and the loop goes on.
"""

from __future__ import annotations

import logging
import signal
import traceback
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Final, assert_never

from envoy_autoreload.backoff import (
    COLD_BACKOFF_CAP_S,
    COLD_BACKOFF_FIRST_S,
    HOT_RESTART_RETRIES,
    HOT_RETRY_FIRST_S,
    CrashBudget,
    DeathPacing,
    exponential_delay,
)
from envoy_autoreload.batches import Batches
from envoy_autoreload.child import ScriptSpawner
from envoy_autoreload.command import describe_exit
from envoy_autoreload.control import ControlConnection, ControlDesk, ControlReply, ControlServer
from envoy_autoreload.digest import Snapshot
from envoy_autoreload.envoy_binary import BinaryInfo
from envoy_autoreload.envoy_config import load_bootstrap
from envoy_autoreload.envoy_outputs import paths_envoy_writes
from envoy_autoreload.errors import BinaryError, ConfigError, ExitCode, SpawnError, ValidationFailed
from envoy_autoreload.family import EnvoyFamily
from envoy_autoreload.gate import CommandGate
from envoy_autoreload.limits import binding_limit, check_limits
from envoy_autoreload.logs import FieldValue, log_event
from envoy_autoreload.loop import DeadlineReached, Event, FdReady, SignalReceived
from envoy_autoreload.loop import Reactor as RealReactor
from envoy_autoreload.ports import Content, EnvoyFacts, Gate, Processes, Reactor
from envoy_autoreload.roster import Generation, Roster
from envoy_autoreload.settings import Settings
from envoy_autoreload.shutdown import Shutdown
from envoy_autoreload.states import (
    FORWARDS_SIGNALS,
    PLAN_EDGES,
    ColdStart,
    GenerationState,
    IllegalMove,
    Plan,
    Respawn,
    StartNext,
    SupervisorState,
    Timer,
    kind_of,
)
from envoy_autoreload.status import StatusView
from envoy_autoreload.telemetry import ExitCause, Telemetry
from envoy_autoreload.triggers import Triggers, runs_already
from envoy_autoreload.validation import PreflightOutcome, Verdict

logger = logging.getLogger(__name__)
envoy_logger = logging.getLogger("envoy_autoreload.envoy")

MAX_FAMILY_PROCESSES: Final = 3
EARLY_DRAIN_MARGIN_S: Final = 0.25
HUNG_DRAIN_GRACE_S: Final = 5.0
PARENT_DIED: Final = "its parent, the serving epoch, died"
# Exit codes by which a POSIX shell says it could not run a command (the script's own
# mistake, not Envoy's).
SHELL_CANNOT_RUN: Final = {126: "a command in it is not executable", 127: "command not found"}


class Supervisor:
    """Runs generations of the start script and keeps one of them serving."""

    def __init__(
        self,
        settings: Settings,
        reactor: Reactor,
        changes: Content | None = None,
        *,
        telemetry: Telemetry | None = None,
        control: ControlServer | None = None,
        processes: Processes | None = None,
        family: EnvoyFacts | None = None,
        gate: Gate | None = None,
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self._changes = changes
        self._telemetry = telemetry or Telemetry()
        self._control = control
        self._desk = ControlDesk(reactor, Timer.CONTROL_IDLE)
        self._batches = Batches(reactor, self._desk, self._telemetry)
        self._family = family or EnvoyFamily(settings)
        spawner = processes or ScriptSpawner(settings.start_script, settings.script_args)
        self._processes = spawner
        self._roster = Roster(spawner, reactor)
        self._gate = gate or CommandGate(settings, reactor, Timer.COMMAND_DEADLINE)
        self._shutdown = Shutdown(reactor, self._roster, self._family, settings.term_wait_s)
        self._triggers = Triggers(changes.roots if changes is not None else ())
        self._view = StatusView(
            self._roster, self._telemetry, self._family, changes, binding_limit("watches").value
        )
        self._plan: Plan | None = None
        self._hot_failures = 0
        self._cold_failures = 0
        self._drain_wait_over = False
        self._crash_budget = CrashBudget()
        self._death_pacing = DeathPacing()
        self._warned: set[str] = set()
        self._binary: BinaryInfo | None = None
        self._preflight_reason = ""
        self._preflight_seq = 0
        self._preflight_content: Snapshot | None = None
        self._cold_attempt_seq = 0  # newest request a cold start has already tried
        self._last_started_content: Snapshot | None = None
        self._ever_served = False
        self._last_failed_seq = 0
        self._last_start_error = ""
        self._status_line: str | None = None
        self._errors_seen: set[str] = set()
        self.internal_errors: list[BaseException] = []

    # -- public ---------------------------------------------------------------
    def run(self) -> ExitCode:
        """Start epoch 0 and supervise until stopped."""
        try:
            self.begin()
            while True:
                code = self.handle(self._reactor.poll())
                if code is not None:
                    return code
        finally:
            self._gate.abandon()
            self._shutdown.kill_leftovers()

    def begin(self) -> None:
        """Start-up, before the loop: refuse a non-Envoy binary or a config that does not
        validate (blocking is fine here), start watching, start epoch 0."""
        self._check_before_first_start()
        if self._changes is not None:
            self._exclude_envoy_outputs(self._changes)
            self._start_watching(self._changes)
        if self._control is not None:
            self._reactor.add_reader(self._control.fileno(), self._control)
        self._start(0, "startup", first=True)

    def handle(self, events: list[Event]) -> ExitCode | None:
        """Handle one poll's events; the exit code once the daemon is done."""
        for event in events:
            self._contained(self._dispatch, event)
            self._contained(self._advance, event)
            code = self._shutdown.exit_code
            if code is not None:
                self._contained(self._publish, event)
                return code
        self._contained(self._publish, None)
        return None

    @property
    def state(self) -> SupervisorState:
        if self._shutdown.stopping:
            return SupervisorState.STOPPING
        serving = self._roster.serving()
        starting = self._roster.starting()
        if serving is None:
            return SupervisorState.STARTING if starting else SupervisorState.RECOVERING
        if self._gate.busy:
            return SupervisorState.VALIDATING
        return SupervisorState.RESTARTING if starting else SupervisorState.SERVING

    @property
    def stopping(self) -> bool:
        return self._shutdown.stopping

    @property
    def plan(self) -> Plan | None:
        return self._plan

    @property
    def roster(self) -> Roster:
        return self._roster

    @property
    def batches(self) -> Batches:
        return self._batches

    def request_restart(
        self, reason: str, changed: list[str] | None = None, events: int | None = None
    ) -> int:
        """Queue a hot restart; any number of queued requests run as one. Returns the
        request's number (answered by the batch that covers it)."""
        seq, first = self._batches.add(reason)
        if self._shutdown.stopping:
            return seq
        # A new request is a new chance: earlier failures no longer count against it.
        self._hot_failures = 0
        serving = self._roster.serving()
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
        return seq

    # -- containment ----------------------------------------------------------
    def _contained(self, handler: _Handler, event: Event | None) -> None:
        """The loop's one containment boundary (DESIGN-core §4): an exception in a
        handler is our bug, never a reason to stop Envoy. Logged once per distinct
        error with its traceback, counted, and the loop goes on."""
        try:
            handler(event)
        except SpawnError:
            if self._ever_served:
                raise AssertionError("start-up errors end start-up only") from None
            raise  # a start script that cannot run Envoy: start-up fails (exit 3)
        except Exception as err:  # noqa: BLE001 -- the containment boundary
            self._internal_error(err, event)

    def _internal_error(self, err: Exception, event: Event | None) -> None:
        self.internal_errors.append(err)
        self._telemetry.internal_errors.inc()
        frames = traceback.extract_tb(err.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        key = f"{type(err).__name__}@{where}"
        self._heal()
        if key in self._errors_seen:
            return
        self._errors_seen.add(key)
        self._event(
            logging.ERROR,
            "daemon.internal_error",
            f"{type(err).__name__}: {err} (while handling {event!r}); Envoy keeps serving, "
            "the daemon carries on; please report this",
            detail="".join(traceback.format_exception(err)).rstrip(),
        )

    def _heal(self) -> None:
        """After a contained error, re-arm what a half-run handler may have left
        unarmed: the probe and deadline of a starting epoch, and one more decision."""
        if self._shutdown.stopping:
            return
        if self._roster.starting() is not None:
            for timer, after_s in (
                (Timer.PROBE, 0.1),
                (Timer.START_DEADLINE, self._settings.start_timeout_s),
            ):
                if not self._reactor.has_deadline(timer):
                    self._reactor.set_timeout(timer, after_s)
        self._reactor.set_timeout(Timer.ADVANCE, 0.1)

    # -- dispatch -------------------------------------------------------------
    def _dispatch(self, event: Event | None) -> None:
        match event:
            case None:
                pass
            case SignalReceived(signum=signum):
                self._on_signal(signum)
            case FdReady(key=Generation() as gen):
                self._on_stderr(gen)
            case FdReady(key=ControlServer() as server):
                self._desk.accept_all(server)
            case FdReady(key=ControlConnection() as conn):
                self._on_control_request(conn)
            case FdReady(key=key):
                self._on_fd(key)
            case DeadlineReached(key=Timer() as timer) if self._reactor.claim(event):
                self._on_timer(timer)
            case DeadlineReached():
                pass  # stale, or not ours
            case _:
                assert_never(event)

    def _on_fd(self, key: Hashable) -> None:
        if key is self._changes and self._changes is not None:
            self._on_watch_readable(self._changes)
        elif self._gate.owns(key):
            self._gate.on_output(key)

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
            case Timer.DRAIN_WAIT:
                self._on_drain_wait_over()
            case Timer.ORPHAN_KILL:
                self._kill_orphans()
            case Timer.HUNG_DRAIN:
                pass
            case Timer.TERM_WAIT:
                self._shutdown.kill_remaining()
            case Timer.KILL_WAIT:
                self._shutdown.kill_timed_out()
            case Timer.DEBOUNCE:
                self._on_burst_due()
            case Timer.COMMAND_DEADLINE:
                self._gate.on_deadline()
            case Timer.CONTROL_IDLE:
                self._desk.drop_idle()
            case _:
                assert_never(timer)

    def _on_drain_wait_over(self) -> None:
        # Whatever waits for the drain: a validated plan, or (with a gate and no
        # watching) the queued requests themselves, which validate after the wait
        # (REVIEW-core finding 2: that wait used to last the whole parent-shutdown time).
        if not isinstance(self._plan, StartNext) and not self._batches.queued:
            return  # stale: what waited for the drain is gone
        self._drain_wait_over = True
        for gen in self._roster.draining():
            self._event(
                logging.WARNING,
                "restart.drain_wait_exceeded",
                f"restarting although epoch {gen.epoch} still drains: Envoy will end "
                "its drain now and its open connections may be reset",
                epoch=gen.epoch,
                pid=gen.pid,
                waited_s=self._settings.max_drain_wait_s,
            )

    def _kill_orphans(self) -> None:
        for gen in self._roster.alive():
            if gen.marks.stop_reason is not None and gen.state is not GenerationState.STARTING:
                self._event(logging.WARNING, "child.killing_orphan", epoch=gen.epoch, pid=gen.pid)
                gen.process.kill()

    def _on_stderr(self, gen: Generation) -> None:
        on_line = None
        if self._settings.log_format == "json":
            # One JSON object a line, Envoy's own lines included, each with its epoch/pid.
            def on_line(line: str) -> None:
                log_event(
                    envoy_logger, logging.INFO, "envoy.output", line, epoch=gen.epoch, pid=gen.pid
                )

        if not gen.process.pump_stderr(on_line):
            fd = gen.process.stderr_fd()
            if fd is not None:
                self._reactor.remove_reader(fd)
            gen.process.close_stderr()

    # -- watching -------------------------------------------------------------
    def _start_watching(self, changes: Content) -> None:
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

    def _exclude_envoy_outputs(self, changes: Content) -> None:
        """Files Envoy writes (access logs) inside a watched tree are no config: each
        `envoy --mode validate` reopens them and every request grows them, so leaving
        them in the digest is a restart loop (REVIEW-core finding 15). Exclusions only
        grow: a draining epoch still writes the old config's log."""
        config = self._settings.config
        if config is None:
            return
        try:
            document = load_bootstrap(config)
        except ConfigError:
            return  # Envoy's own validation says what is wrong with it
        if isinstance(document, Mapping):
            # Relative paths are Envoy's, and Envoy runs in our working directory.
            changes.exclude_paths(paths_envoy_writes(document, Path.cwd()))

    def _on_watch_readable(self, changes: Content) -> None:
        self._telemetry.watch_events.inc(changes.on_readable(self._reactor.now()))
        deadline = changes.deadline()
        if deadline is not None:
            self._reactor.set_deadline(Timer.DEBOUNCE, deadline)

    def _current_content(self, changes: Content) -> Snapshot:
        """What is on disk now; events already in the kernel's queue are read first (and
        start their debounce), so "nothing happened since the last scan" is true."""
        if changes.active:
            self._on_watch_readable(changes)
        return changes.current()

    def _on_burst_due(self) -> None:
        changes = self._changes
        if changes is None:
            return
        burst = changes.settle(self._reactor.now())
        if burst is None:
            deadline = changes.deadline()
            if deadline is not None:
                self._reactor.set_deadline(Timer.DEBOUNCE, deadline)
            return
        serving = self._roster.serving()
        verdict = self._triggers.judge(
            burst,
            self._newest_content(),
            self._last_started_content,
            serving,
            self._config_of(serving),
        )
        if verdict is not None:
            self.request_restart("files_changed", verdict.changed, verdict.events)

    def _held_while_missing(self, snapshot: Snapshot, reference: Snapshot | None) -> bool:
        serving = self._roster.serving()
        return self._triggers.held(
            snapshot, reference or self._last_started_content, serving, self._config_of(serving)
        )

    def _newest_content(self) -> Snapshot | None:
        """The content the newest attempt carries: being validated, validated and
        waiting to start, starting, or serving. A failed attempt is none of these."""
        if self._gate.busy:
            return self._preflight_content
        if isinstance(self._plan, StartNext) and self._plan.content is not None:
            return self._plan.content
        generation = self._roster.starting() or self._roster.serving()
        return generation.snapshot if generation is not None else None

    # -- the plan ---------------------------------------------------------------
    def _replan(self, new: Plan | None, why: str) -> None:
        """The one writer of the plan: every move must be in `PLAN_EDGES`."""
        edge = (kind_of(self._plan), kind_of(new))
        if why not in PLAN_EDGES.get(edge, frozenset()):
            raise IllegalMove(f"plan {edge[0].value} -> {edge[1].value} ({why}) not allowed")
        self._plan = new

    # -- what to start next -----------------------------------------------------
    def _advance(self, _event: Event | None = None) -> None:
        """Start the next generation if one is wanted and allowed now (gunicorn's
        `manage_workers`: a few questions, each answered by a method of its own)."""
        if self._shutdown.stopping or self._shutdown.exit_code is not None:
            return
        if self._roster.starting() is not None:
            return
        serving = self._roster.serving()
        if serving is None:
            self._recover(backing_off=self._reactor.has_deadline(Timer.RETRY))
            return
        if serving.marks.stop_reason is not None or self._gate.busy:
            return  # a full restart is under way, or requests wait for the gate, as one
        plan = self._plan
        absorbed = self._batches.queued and self._absorb_requests(plan)
        if self._batches.queued and not absorbed and not self._take_requests(serving):
            return
        plan = self._plan
        if not isinstance(plan, StartNext):
            self._reactor.cancel(Timer.DRAIN_WAIT)
            self._drain_wait_over = False
            return
        if self._reactor.has_deadline(Timer.RETRY):
            return  # a retry waits out its backoff
        if self._changed_since_validated(plan):
            return
        if serving.marks.doomed:
            # Its parent died early: a hot restart from it would hang (measured). The
            # validated request is carried out as a stop and a cold start instead.
            self._full_restart(serving, plan)
            return
        if self._socket_taken(serving):
            self._stop_hung_drains(serving)
            return  # a cut drain is ending; its exit wakes us again
        if self._must_wait_for_drain():
            return
        self._start_next(serving, plan)

    def _absorb_requests(self, plan: Plan | None) -> bool:
        """Requests that arrive while validated content waits to start, and ask for
        exactly that content, join it instead of superseding it: a stream of requests
        faster than validation used to restart nothing at all (REVIEW-core finding 15)."""
        if not isinstance(plan, StartNext) or plan.content is None or self._changes is None:
            return False
        if self._current_content(self._changes).digest != plan.content.digest:
            return False  # the content moved on: the requests go through the gate
        reasons = ",".join(dict.fromkeys([*plan.reason.split(","), *self._batches.queued]))
        self._batches.queued.clear()
        self._batches.seq = self._batches.request_seq
        self._replan(StartNext(reasons, self._batches.request_seq, plan.content), "absorbed")
        return True

    def _socket_taken(self, serving: Generation) -> bool:
        """Whether the next epoch cannot start yet: three of the family are alive, or an
        older epoch still holds the domain socket the next one needs (mod 3, §0, §4)."""
        alive = self._roster.alive()
        slot = (serving.epoch + 1) % 3
        held = any(g is not serving and g.epoch % 3 == slot for g in alive)
        return held or len(alive) >= MAX_FAMILY_PROCESSES

    def _stop_hung_drains(self, serving: Generation) -> None:
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
            self._event(
                logging.WARNING,
                "child.hung_drain",
                f"{reason}; it blocks epoch {serving.epoch + 1}, so it is killed",
                epoch=gen.epoch,
                pid=gen.pid,
            )
            gen.process.kill()
        if next_due is not None:
            self._reactor.set_deadline(Timer.HUNG_DRAIN, next_due)

    def _take_requests(self, serving: Generation) -> bool:
        """Turn the queued requests into a batch; True when a plan may follow now."""
        if self._requests_change_nothing(serving) or self._requests_held(serving):
            return False
        if self._gate.enabled and self._changes is None and self._must_wait_for_drain():
            # Nothing pins what was validated without watching: validate right before
            # the start instead, after the drain wait.
            return False
        reason = self._batches.take()
        if self._gate.enabled:
            self._begin_preflight(reason)
            if not self._gate.busy:
                # Decided at once (nothing had to run: a known binary, no config to
                # validate): no event will follow to carry the plan out. Back through
                # the loop, not recursion: signals and exits come first.
                self._reactor.set_timeout(Timer.ADVANCE, 0)
            return False
        self._replan(StartNext(reason, self._batches.seq), "no_gate")
        self._reactor.cancel(Timer.RETRY)
        return True

    def _changed_since_validated(self, plan: StartNext) -> bool:
        """Never start unvalidated content: a change since validation goes back to the
        gate as a new request."""
        if plan.content is None or self._changes is None:
            return False
        current = self._current_content(self._changes)
        if current.digest == plan.content.digest:
            return False
        if self._held_while_missing(current, plan.content):
            self._replan(None, "went_missing")
            self._drop_held_batch(plan)
            return True
        self._replan(None, "changed_since_validated")
        self.request_restart("files_changed", current.changed_since(plan.content))
        self._reactor.set_timeout(Timer.ADVANCE, 0)
        return True

    def _start_next(self, serving: Generation, plan: StartNext) -> None:
        self._replan(None, "started")
        self._drain_wait_over = False
        for draining in self._roster.draining():
            # A third process makes the serving one end this drain at once (§8).
            self._roster.mark_drain_cut(draining)
        self._reactor.cancel(Timer.RETRY)
        self._reactor.cancel(Timer.DRAIN_WAIT)
        self._start(
            serving.epoch + 1,
            plan.reason,
            parent=serving,
            covers_seq=plan.seq,
            content=plan.content,
        )

    def _requests_change_nothing(self, serving: Generation) -> bool:
        """Queued requests that only say "files changed" (or a plain reload), when the
        content is what serves: answered as unchanged, not restarted (a batch requeued
        after a recovery, a push re-run). SIGHUP and forced reloads always restart."""
        changes = self._changes
        if not set(self._batches.queued) <= {"files_changed", "control"}:
            return False
        if changes is None or not self._settings.watch or serving.snapshot is None:
            return False
        current = self._current_content(changes)
        if not runs_already(serving.snapshot, current, logging.INFO, serving):
            return False
        self._batches.queued.clear()
        plan = self._plan
        if isinstance(plan, StartNext) and plan.content is not None:
            # A validated restart of content that is gone again (REVIEW-core finding 9):
            # dropped, not carried out later with a false drain_wait_exceeded.
            self._replan(None, "reverted")
            self._reactor.cancel(Timer.RETRY)
            self._reactor.cancel(Timer.DRAIN_WAIT)
            self._drain_wait_over = False
        self._batches.finish(
            "unchanged",
            "files_changed",
            seq=self._batches.request_seq,
            status=self._status_text(),
            epoch=serving.epoch,
            message="unchanged, already serving",
        )
        return True

    def _requests_held(self, serving: Generation) -> bool:
        """File changes wait while a watched path is missing (its return is a change of
        its own); an operator's SIGHUP or reload still goes to the gate."""
        if self._changes is None or not set(self._batches.queued) <= {"files_changed"}:
            return False
        return self._held_while_missing(self._current_content(self._changes), serving.snapshot)

    def _must_wait_for_drain(self) -> bool:
        draining = self._roster.draining()
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

    def _drop_held_batch(self, plan: StartNext) -> None:
        """A validated restart whose files went missing before it started: it is over
        (refused); the files' return is a change like any other."""
        message = f"not restarted: {', '.join(self._triggers.missing.reported)} went missing"
        self._batches.finish(
            "refused", plan.reason, seq=plan.seq, error=message, status=self._status_text()
        )

    # -- recovery ---------------------------------------------------------------
    def _recover(self, backing_off: bool) -> None:
        """Nothing serves: respawn from a draining parent if one is there, else epoch 0."""
        plan = self._plan
        if isinstance(plan, Respawn):
            parents = self._roster.draining()
            if parents:
                # Answers no reload: the dead epoch's own batch was answered when it went
                # LIVE, and requests since then still need the gate.
                self._replan(None, "started")
                self._start(plan.epoch, "recovery", parent=parents[-1])
                return
            self._replan(ColdStart("recovery"), "recovery")
        elif not isinstance(plan, ColdStart):
            if plan is None and not self._batches.queued:
                return
            # Nothing serves: whatever else was planned, recovery comes first.
            self._replan(ColdStart("recovery"), "recovery")
        cold = self._plan
        assert isinstance(cold, ColdStart)
        orphans = self._roster.alive()
        if orphans:
            # Epoch 0 cannot bind its domain socket while any of the family lives
            # (#10902); a draining parent without a successor serves nothing.
            self._stop_orphans(orphans)
            return
        # A request newer than the last cold attempt (an operator's SIGHUP, a fixed
        # config) skips the backoff once; queued requests are not consumed: they pass
        # the gate once something serves.
        fresh_request = self._batches.request_seq > self._cold_attempt_seq
        if backing_off and not fresh_request:
            return
        self._cold_attempt_seq = self._batches.request_seq
        self._replan(None, "started")
        self._reactor.cancel(Timer.RETRY)
        self._start(0, cold.reason, covers_seq=cold.covers_seq)

    def _stop_orphans(self, orphans: list[Generation]) -> None:
        """Newest first: a draining parent is never signalled while its successor lives
        (§6); once the successor is gone Envoy ends the parent (a "child request"), or
        it is TERMed then. A hung orphan (§7) is KILLed after --term-wait."""
        alive_epochs = {g.epoch for g in orphans}
        for orphan in reversed(orphans):
            if orphan.marks.stop_reason is None:
                reason = "no successor serves; stopped so epoch 0 can start"
                self._roster.mark_stopping(orphan, reason)
                self._event(
                    logging.WARNING,
                    "child.stopping_orphan",
                    reason,
                    epoch=orphan.epoch,
                    pid=orphan.pid,
                )
            if orphan.epoch + 1 not in alive_epochs and not orphan.marks.terminated:
                self._terminate(orphan)

    def _full_restart(self, serving: Generation, plan: StartNext) -> None:
        """A doomed epoch cannot hot restart (its child hangs, measured); stop it and
        cold-start epoch 0 with the validated request: the ~0.1 s outage its abort would
        cause anyway, at a moment of the operator's choosing."""
        reason = "full restart: its parent died early, so it cannot hot restart"
        self._roster.mark_stopping(serving, reason)
        self._event(
            logging.WARNING,
            "restart.full",
            f"{reason}; stopping it and starting epoch 0 (a short outage)",
            epoch=serving.epoch,
            pid=serving.pid,
        )
        self._replan(ColdStart(plan.reason, covers_seq=plan.seq), "full_restart")
        self._terminate(serving)

    def _terminate(self, gen: Generation) -> None:
        """TERM one we decided to stop; KILL it after --term-wait if it hangs (§7)."""
        self._roster.mark_terminated(gen)
        gen.process.send_signal(signal.SIGTERM)
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
        self._preflight_seq = self._batches.seq
        # Pinned before validating: what starts must be what was validated (see _advance).
        self._preflight_content = (
            self._current_content(self._changes) if self._changes is not None else None
        )
        outcome = self._gate.begin(self._binary)
        if outcome is not None:
            self._on_preflight_done(outcome)

    def _on_preflight_done(self, outcome: PreflightOutcome) -> None:
        serving = self._roster.serving()
        self._log_outcome(outcome, epoch=serving.epoch if serving else None)
        reason = self._preflight_reason
        if serving is None or isinstance(self._plan, Respawn | ColdStart):
            self._batches.requeue(reason)  # recovery first; it passes the gate after it
            return
        if not outcome.ok and self._changed_while_validating():
            # A config deleted and recreated (or rewritten) while Envoy read it: not a
            # validation failure of anything anyone pushed (REVIEW-core finding 15).
            self._event(
                logging.INFO,
                "validation.superseded",
                "the files changed while they were validated; validating them again",
                epoch=serving.epoch,
                pid=serving.pid,
            )
            self._batches.requeue(reason)
            return
        if not outcome.ok:
            if isinstance(self._plan, StartNext):
                self._replan(None, "gate_failed")  # what is on disk now failed
            refused = outcome.verdict is Verdict.BINARY_REFUSED
            self._batches.finish(
                "refused" if refused else "validation_failed",
                reason,
                seq=self._preflight_seq,
                error=outcome.message,
                status=self._status_text(),
            )
            return
        binary = outcome.binary
        # What the serving Envoy itself reported at LIVE wins over what we believed we
        # started: a recovery start runs whatever binary is on disk.
        running = serving.binary if serving.binary else self._binary
        running_version = self._family.hot_restart_version or (
            running.hot_restart_version if running else None
        )
        if binary is not None and running_version and binary.hot_restart_version != running_version:
            self._on_incompatible_binary(binary, running_version, reason)
            return
        if binary is not None:
            self._binary = binary
        if self._changes is not None:
            self._exclude_envoy_outputs(self._changes)  # the config that will run
        # A request that passed the gate is a new chance: no backoff, no old failures.
        self._hot_failures = 0
        self._reactor.cancel(Timer.RETRY)
        self._replan(StartNext(reason, self._preflight_seq, self._preflight_content), "gate_passed")

    def _changed_while_validating(self) -> bool:
        pinned = self._preflight_content
        if pinned is None or self._changes is None:
            return False
        return self._current_content(self._changes).digest != pinned.digest

    def _on_incompatible_binary(
        self, binary: BinaryInfo, running_version: str, reason: str
    ) -> None:
        what = (
            f"{binary.path} ({binary.release}) has hot-restart version "
            f"{binary.hot_restart_version}, the running Envoy {running_version}: a hot "
            "restart into it cannot work (its shared memory differs, #14224)"
        )
        if self._settings.on_incompatible_binary == "refuse":
            serving = self._roster.serving()
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
            self._batches.finish(
                "refused",
                reason,
                seq=self._preflight_seq,
                error=what,
                message=f"refused: {what}",
                status=self._status_text(),
            )
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
        for gen in self._roster.alive():
            self._roster.mark_stopping(gen, "replaced by an incompatible binary")
            self._terminate(gen)
        self._replan(
            ColdStart("incompatible binary", covers_seq=self._preflight_seq),
            "incompatible_binary",
        )

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
        serves = epoch is not None and self._roster.serving() is not None
        self._event(
            logging.ERROR,
            outcome.verdict.value,
            outcome.message + (f"; epoch {epoch} keeps serving" if serves else ""),
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
        if parent is not None:
            # No child of ours is starting, so a set flag can only be a dead child's.
            self._family.restore_flag(parent, epoch)
        if self._changes is not None and content is None:
            # What this epoch starts from; a burst that settles later and finds the
            # same content then restarts nothing. Cheap: unchanged files are not read.
            content = self._current_content(self._changes)
        try:
            gen = self._roster.spawn(
                epoch, reason, covers_seq=covers_seq, snapshot=content, binary=self._binary
            )
        except OSError as err:
            message = f"cannot execute start script {self._settings.start_script}: {err.strerror}"
            if first:
                raise SpawnError(message) from err
            self._on_exec_failed(epoch, reason, message, covers_seq, content)
            return
        if content is not None:
            self._last_started_content = content
        fd = gen.process.stderr_fd()
        if fd is not None:
            self._reactor.add_reader(fd, gen)
        self._reactor.set_timeout(Timer.START_DEADLINE, self._settings.start_timeout_s)
        self._reactor.set_timeout(Timer.PROBE, 0.01)

    def _on_exec_failed(
        self, epoch: int, reason: str, message: str, covers_seq: int, content: Snapshot | None
    ) -> None:
        serving = self._roster.serving()
        self._event(
            logging.ERROR,
            "restart.failed",
            message + (f"; epoch {serving.epoch} keeps serving" if serving else ""),
            epoch=epoch,
            cause="exec failed",
        )
        self._last_failed_seq = covers_seq
        self._last_start_error = message
        self._batches.retry_pending(reason, error=message, status=self._status_text())
        self._after_failed_start(epoch, "exec failed", content)

    def _probe(self) -> None:
        gen = self._roster.starting()
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
        elapsed = self._reactor.now() - gen.started_at
        self._reactor.set_timeout(Timer.PROBE, min(0.1, max(0.01, elapsed / 4)))

    def _on_live(self, gen: Generation) -> None:
        self._reactor.cancel(Timer.PROBE)
        self._reactor.cancel(Timer.START_DEADLINE)
        self._roster.went_live(gen)
        self._ever_served = True
        self._triggers.abandoned_digest = None
        self._hot_failures = 0
        self._cold_failures = 0
        self._check_command_line(gen)
        if gen.marks.owes_sigusr1:
            self._roster.owe_sigusr1(gen, False)
            gen.process.signal_envoy(signal.SIGUSR1, gen.envoy)
            self._event(
                logging.INFO,
                "signal.forwarded",
                "SIGUSR1 that arrived while it started",
                signal="SIGUSR1",
                epochs=[gen.epoch],
                pids=[gen.pid],
            )
        reply = ControlReply(True, f"serving ({gen.reason})", gen.epoch)
        if gen.covers_seq and self._batches.in_flight:
            self._batches.finish(
                "success",
                gen.reason,
                seq=gen.covers_seq,
                status=self._status_text(),
                epoch=gen.epoch,
                message=reply.message,
            )
        else:
            self._batches.served_without_batch(self._status_text(), gen.covers_seq, reply)

    def _check_command_line(self, gen: Generation) -> None:
        """At each LIVE, what the daemon was told against what Envoy runs (/proc): a
        wrong --config validates the wrong file and probes the wrong admin (finding 3)."""
        for mismatch in self._family.mismatches(gen):
            self._warn_once(
                "config.mismatch",
                f"{mismatch}: validation and LIVE checks may look at the wrong thing",
                epoch=gen.epoch,
                pid=gen.pid,
            )

    def _adopt_if_took_over(self, gen: Generation) -> bool:
        """Before giving a starting epoch up: did it go LIVE since the last probe, or
        tell its parent to drain (the flag is clear) while its admin is not where we
        ask? Killing it then would strand the parent, which refuses new connections
        once its child took over (REVIEW-core finding 3)."""
        self._family.observe(gen)
        if self._family.is_live(gen):
            self._on_live(gen)
            return True
        if not self._family.handed_over(gen):
            return False
        self._event(
            logging.WARNING,
            "child.admin_unreachable",
            f"epoch {gen.epoch} took over from its parent but its admin never reported "
            "LIVE where the daemon asks; counting it as serving. Check --admin-address "
            "and --config against what the start script gives Envoy",
            epoch=gen.epoch,
            pid=gen.pid,
        )
        self._on_live(gen)
        return True

    def _on_start_deadline(self) -> None:
        gen = self._roster.starting()
        if gen is None:
            return
        if self._adopt_if_took_over(gen):
            return
        reason = f"not LIVE within --start-timeout {self._settings.start_timeout_s:g} s"
        self._roster.mark_stopping(gen, reason)
        self._event(logging.WARNING, "child.start_timeout", reason, epoch=gen.epoch, pid=gen.pid)
        # A child can wait forever on an unresponsive parent (§7); kill it, never the parent.
        gen.process.kill()

    # -- exits ----------------------------------------------------------------
    def _reap(self) -> None:
        for gen in self._roster.alive():
            if gen.process.poll() is not None:
                self._on_exited(gen)
        outcome = self._gate.poll()
        if outcome is not None:
            self._on_preflight_done(outcome)
        # As PID 1 (a container without an init) orphans are reparented to us; reap
        # what is not ours so zombies do not pile up (REVIEW-core finding 14).
        ours = {g.pid for g in self._roster.alive()} | self._gate.child_pids()
        self._processes.reap_strays(ours)

    def _on_exited(self, gen: Generation) -> None:
        self._on_stderr(gen)
        previous = self._roster.exited(gen)
        self._family.forget(gen)
        assert gen.returncode is not None
        status = describe_exit(gen.returncode)
        self._telemetry.child_exited(_exit_cause(previous, gen, self._shutdown.stopping))
        if self._shutdown.stopping:
            self._event(logging.INFO, "child.exited", epoch=gen.epoch, pid=gen.pid, status=status)
            self._shutdown.finish_if_done()
            return
        match previous:
            case GenerationState.STARTING:
                self._on_start_failed(gen, gen.marks.stop_reason or status)
            case GenerationState.SERVING:
                self._on_serving_died(gen, status)
            case GenerationState.DRAINING:
                self._on_drained(gen, status)
            case GenerationState.EXITED:
                raise IllegalMove("an exited generation cannot exit again")
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
        serving = self._roster.serving()
        self._last_start_error = (
            f"epoch {gen.epoch} failed to start: {gen.last_error_line() or cause}"
        )
        self._event(
            logging.INFO if cause == PARENT_DIED else logging.ERROR,
            "restart.failed",
            self._last_start_error + (f"; epoch {serving.epoch} keeps serving" if serving else ""),
            detail="\n".join(gen.stderr_tail) or None,
            epoch=gen.epoch,
            pid=gen.pid,
            cause=cause,
        )
        self._last_failed_seq = gen.covers_seq
        if cause != PARENT_DIED:
            self._batches.retry_pending(
                gen.reason, error=self._last_start_error, status=self._status_text()
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
        if self._roster.serving() is None:
            respawn_failed = bool(self._roster.draining())
            self._on_outage_failure(f"epoch {epoch} failed to start", immediate=respawn_failed)
            return
        self._hot_failures += 1
        if self._hot_failures > HOT_RESTART_RETRIES:
            self._abandon(epoch, content)
            return
        delay = exponential_delay(self._hot_failures, HOT_RETRY_FIRST_S, COLD_BACKOFF_CAP_S)
        self._replan(StartNext("retry", self._last_failed_seq, content), "retry")
        self._reactor.set_timeout(Timer.RETRY, delay)
        self._event(
            logging.INFO,
            "restart.retry_scheduled",
            epoch=epoch,
            attempt=self._hot_failures + 1,
            in_s=delay,
        )

    def _abandon(self, epoch: int, content: Snapshot | None) -> None:
        self._event(
            logging.WARNING,
            "restart.abandoned",
            f"epoch {epoch} failed {self._hot_failures} times; keeping the serving epoch "
            "until the next change or SIGHUP",
            epoch=epoch,
        )
        self._hot_failures = 0
        if self._plan is not None:
            self._replan(None, "abandoned")
        # The same content again (a push re-run) is not a new chance; a change is.
        self._triggers.abandoned_digest = content.digest if content is not None else None
        self._batches.finish(
            "abandoned",
            "retry",
            seq=self._last_failed_seq,
            error=self._last_start_error,
            status=self._status_text(),
        )

    def _on_serving_died(self, gen: Generation, status: str) -> None:
        planned = gen.marks.stop_reason is not None
        successor = self._roster.starting()
        if not planned and successor is not None and self._adopt_if_took_over(successor):
            # Envoy ended its drain: the successor had taken over unseen (finding 3).
            self._event(
                logging.INFO,
                "child.exited",
                "drain finished",
                epoch=gen.epoch,
                pid=gen.pid,
                status=status,
            )
            return
        self._event(
            logging.INFO if planned else logging.ERROR,
            "child.died",
            f"the serving Envoy exited ({status}): {gen.marks.stop_reason}"
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
                self._replan(
                    ColdStart(f"full restart ({gen.marks.stop_reason})"), "serving_stopped"
                )
            return
        self._requeue_pending()
        if self._settings.exit_on_child_failure:
            self._begin_stop(
                "the serving child died and --exit-on-child-failure is set", ExitCode.CHILD_KILLED
            )
            return
        starting = self._roster.starting()
        if starting is not None:
            # Its parent is gone: it would hang or abort (§5, measured), never serve.
            self._roster.mark_stopping(starting, PARENT_DIED)
            starting.process.kill()
            self._batches.requeue(starting.reason)
        parents = self._roster.draining()
        if parents and not gen.marks.doomed and parents[-1].epoch == gen.epoch - 1:
            self._replan(Respawn(gen.epoch), "serving_died")
        served_s = self._reactor.now() - (gen.serving_at or gen.started_at)
        self._on_outage_failure(f"serving epoch {gen.epoch} died", served_s=served_s)

    def _requeue_pending(self) -> None:
        """A batch the dead epoch was about to take (being validated, or validated and
        waiting, or starting) goes back in the queue: it passes the gate and is answered
        once something serves again. Nothing is dropped silently."""
        if self._gate.busy:
            self._gate.abandon()
            self._batches.requeue(self._preflight_reason)
        plan = self._plan
        if isinstance(plan, StartNext):
            self._batches.requeue(plan.reason)
            self._replan(None, "serving_died")
        elif plan is not None:
            raise IllegalMove(f"a recovery plan while an epoch served: {plan}")

    def _on_drained(self, gen: Generation, status: str) -> None:
        successor = self._roster.serving()
        if successor is not None and self._died_early(gen, successor):
            # Measured: the successor aborts ~10 s after its parent-shutdown time
            # (sooner when that is >= 5 s), and a hot restart from it hangs for ever
            # with the flag stuck. So no hot restart: epoch 0 at the next request, or
            # the moment it dies.
            self._roster.mark_doomed(successor)
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
        ended = "drain cut short by a newer epoch" if gen.marks.drain_cut_by_restart else None
        self._event(
            logging.INFO,
            "child.exited",
            gen.marks.stop_reason or ended or "drain finished",
            epoch=gen.epoch,
            pid=gen.pid,
            status=status,
        )

    def _died_early(self, gen: Generation, successor: Generation) -> bool:
        """Before Envoy would have ended it; unknown timing never counts as early."""
        if gen.marks.drain_cut_by_restart or gen.draining_since is None:
            return False
        shutdown_s = self._family.parent_shutdown_s(successor)
        if shutdown_s is None:
            return False
        return self._reactor.now() < gen.draining_since + shutdown_s - EARLY_DRAIN_MARGIN_S

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
        now = self._reactor.now()
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
        if not isinstance(self._plan, Respawn | ColdStart):
            self._replan(ColdStart("recovery"), "recovery")
        epoch = self._plan.epoch if isinstance(self._plan, Respawn) else 0
        delay = self._recovery_delay(now, immediate, served_s)
        if delay:
            self._reactor.set_timeout(Timer.RETRY, delay)
        self._event(logging.INFO, "restart.recovery_scheduled", what, epoch=epoch, in_s=delay)

    def _recovery_delay(self, now: float, immediate: bool, served_s: float | None) -> float:
        if served_s is not None:
            delay = self._death_pacing.delay_after(served_s, now)
            return 0.0 if isinstance(self._plan, Respawn) else delay
        if immediate:
            return 0.0
        self._cold_failures += 1
        return exponential_delay(self._cold_failures, COLD_BACKOFF_FIRST_S, COLD_BACKOFF_CAP_S)

    # -- stopping -------------------------------------------------------------
    def _begin_stop(self, reason: str, floor: ExitCode) -> None:
        if not self._shutdown.begin(reason, floor):
            return
        for timer in Timer:
            self._reactor.cancel(timer)
        self._gate.abandon()
        self._telemetry.stopping(f"stopping: {reason}")
        self._batches.finish(
            "stopping",
            reason,
            seq=self._batches.request_seq,
            status=self._status_text(),
            message=f"the daemon is stopping ({reason})",
        )
        if self._control is not None:
            self._reactor.remove_reader(self._control.fileno())
        self._shutdown.signal_all(reason)

    # -- control socket and status -------------------------------------------
    def _on_control_request(self, conn: ControlConnection) -> None:
        request = self._desk.read(conn)
        if request is None:
            return
        match request.split():
            case ["status"]:
                conn.reply(ControlReply(True, self.state.value, status=self._status()))
            case ["reload", *flags] if set(flags) <= {"--force"}:
                self._control_reload(conn, force=bool(flags))
            case []:
                conn.close()
            case _:
                conn.reply(ControlReply(False, f"unknown request {request!r}: reload, status"))

    def _control_reload(self, conn: ControlConnection, *, force: bool) -> None:
        if self._shutdown.stopping:
            conn.reply(ControlReply(False, "the daemon is stopping"))
            return
        serving = self._roster.serving()
        idle = (
            not self._gate.busy
            and self._roster.starting() is None
            and not self._batches.queued
            and self._plan is None  # a validated restart waits: the reload joins it (9)
        )
        if (
            not force
            and idle
            and serving is not None
            and self._changes is not None
            # The cheap `current()` (events drained first), not a full walk: a walk of
            # 100,000 files stalls the loop about a second (REVIEW-core finding 12).
            and runs_already(
                serving.snapshot, self._current_content(self._changes), logging.INFO, serving
            )
        ):
            conn.reply(ControlReply(True, "unchanged, already serving", serving.epoch))
            return
        self._batches.wait(self.request_restart("control --force" if force else "control"), conn)

    def _status(self) -> dict[str, object]:
        return self._view.snapshot(self.state, self._binary)

    def _status_text(self) -> str:
        return self._view.line(self.state)

    def _publish(self, _event: Event | None = None) -> None:
        serving = self._roster.serving()
        self._telemetry.epoch.set(serving.epoch if serving else -1)
        self._telemetry.generations_alive.set(len(self._roster.alive()))
        line = self._status_text()
        self._telemetry.publish(self._status(), line if line != self._status_line else None)
        self._status_line = line

    # -- helpers --------------------------------------------------------------
    def _forward(self, signum: signal.Signals) -> None:
        # Not to a starting child: before Envoy installs its handlers, SIGUSR1's default
        # action would kill it (and a shell that did not exec dies of it, §11).
        targets = [g for g in self._roster.alive() if g.state in FORWARDS_SIGNALS]
        for gen in targets:
            gen.process.signal_envoy(signum, gen.envoy)
        starting = self._roster.starting()
        if starting is not None:
            # Replayed once it serves: a log rotation during a restart would otherwise
            # leave the new epoch writing to the rotated file (REVIEW-core finding 14).
            self._roster.owe_sigusr1(starting, True)
        self._event(
            logging.INFO,
            "signal.forwarded",
            signal=signum.name,
            epochs=[g.epoch for g in targets],
            pids=[g.pid for g in targets],
        )

    def _config_of(self, serving: Generation | None) -> Path | None:
        """The -c the serving Envoy runs, when --config does not name it: a missing
        path check needs it (see `MissingPaths.hold`)."""
        if self._settings.config is None and serving is not None:
            return self._family.config_path(serving)
        return None

    def _warn_once(self, event: str, message: str, epoch: int, pid: int) -> None:
        if event not in self._warned:
            self._warned.add(event)
            self._event(logging.WARNING, event, message, epoch=epoch, pid=pid)

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


_Handler = Callable[[Event | None], None]


def _exit_cause(previous: GenerationState, gen: Generation, stopping: bool) -> ExitCause:
    if stopping:
        return "stopped"
    match previous:
        case GenerationState.STARTING:
            return "start_failed"
        case GenerationState.SERVING:
            return "replaced" if gen.marks.stop_reason else "died"
        case _:
            return "drained"


def run(
    settings: Settings,
    changes: Content | None = None,
    *,
    telemetry: Telemetry | None = None,
    control: ControlServer | None = None,
) -> ExitCode:
    """Supervise until stopped; the reactor's signal handlers live exactly this long."""
    with RealReactor() as reactor:
        try:
            return Supervisor(
                settings, reactor, changes, telemetry=telemetry, control=control
            ).run()
        finally:
            if changes is not None:
                changes.close()
