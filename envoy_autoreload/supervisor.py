"""The restarter core's decisions: which generation to start, and when.

Read `states.py` first: it holds every state, every allowed move and every deadline. This
module decides what to start next (`_advance`); `exits.py` decides what an exit means,
`recovery.py` paces recovery, `gatekeeper.py` reads the gate's verdicts, `launcher.py`
starts an epoch and tells when it is LIVE, `roster.py` records the generations,
`batches.py` answers requests, `triggers.py` and `watching.py` turn file changes into
requests, `shutdown.py` stops, `status.py` shows, `containment.py` keeps a bug of ours
from reaching Envoy.
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

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Hashable
from typing import assert_never

from envoy_autoreload.adoption import CoreParts, adopt_family
from envoy_autoreload.batches import Batches
from envoy_autoreload.check_ahead import CheckAhead
from envoy_autoreload.child import ScriptSpawner
from envoy_autoreload.command import describe_exit
from envoy_autoreload.containment import Containment
from envoy_autoreload.control import ControlConnection, ControlDesk, ControlReply, ControlServer
from envoy_autoreload.control_requests import ControlRequests
from envoy_autoreload.digest import Snapshot
from envoy_autoreload.errors import ExitCode
from envoy_autoreload.exits import ExitPolicy
from envoy_autoreload.family import EnvoyFamily
from envoy_autoreload.gate import CommandGate
from envoy_autoreload.gatekeeper import Gatekeeper
from envoy_autoreload.handover import Handover
from envoy_autoreload.head_start import EarlyEpoch0
from envoy_autoreload.health import HealthProber
from envoy_autoreload.intake import Intake
from envoy_autoreload.launcher import Launcher
from envoy_autoreload.limits import binding_limit
from envoy_autoreload.lineage import Lineage, open_lineage
from envoy_autoreload.live_probe import ServerInfoAsker
from envoy_autoreload.logs import batched_output, log_event
from envoy_autoreload.loop import DeadlineReached, Event, FdReady, SignalReceived
from envoy_autoreload.loop import Reactor as RealReactor
from envoy_autoreload.planner import Planner
from envoy_autoreload.ports import Content, EnvoyFacts, Gate, Health, Processes, Reactor
from envoy_autoreload.probation import Probation
from envoy_autoreload.ready_start import ReadyStart
from envoy_autoreload.recovery import Recovery
from envoy_autoreload.reexec import Reexec
from envoy_autoreload.rollbacks import Rollbacks
from envoy_autoreload.roster import Generation, Roster
from envoy_autoreload.settings import Settings
from envoy_autoreload.shutdown import Shutdown, Stopping
from envoy_autoreload.states import (
    Plan,
    StartNext,
    SupervisorState,
    Timer,
)
from envoy_autoreload.status import StatusView
from envoy_autoreload.telemetry import Telemetry
from envoy_autoreload.traps import startup_traps
from envoy_autoreload.triggers import Triggers
from envoy_autoreload.watching import Watching

logger = logging.getLogger(__name__)
envoy_logger = logging.getLogger("envoy_autoreload.envoy")


Callback = Callable[[], None]


def _nothing() -> None:
    return None


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
        lineage: Lineage | None = None,
        health: Health | None = None,
        live_answers: ServerInfoAsker | None = None,
        status_fd: int | None = None,
        execs: bool = True,
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self._telemetry = telemetry = telemetry or Telemetry()
        self._control = control
        self._desk = ControlDesk(reactor, Timer.CONTROL_IDLE)
        self._batches = Batches(reactor, self._desk, telemetry)
        self._family = family = family or EnvoyFamily(settings)
        self._processes = processes or ScriptSpawner(settings.start_script, settings.script_args)
        self._roster = roster = Roster(self._processes, reactor)
        self._planner = Planner()
        self._lineage = lineage = lineage or Lineage(None, bytes)
        self._health = health
        self._live_answers = live_answers
        self._watching = (
            Watching(settings, reactor, changes, telemetry, roster) if changes else None
        )
        self._triggers = Triggers(changes.roots if changes is not None else ())
        gate = gate or CommandGate(settings, reactor, Timer.COMMAND_DEADLINE)
        self._gatekeeper = Gatekeeper(settings, gate, self._batches, family, lineage)
        self._assemble_starting(health)
        self._assemble_reexec(control, status_fd, execs)
        self._assemble_deciders(family, telemetry)
        stopping = Stopping(gate, telemetry, self._batches, control)
        self._shutdown = Shutdown(reactor, self._roster, family, settings.term_wait_s, stopping)
        self._containment = Containment(telemetry, self._heal, reactor.now, self._reexec.request)
        watch_limit = binding_limit("watches").value
        self._view = StatusView(self._roster, telemetry, family, changes, watch_limit, lineage)
        self._ever_served = False

    def _assemble_starting(self, health: Health | None) -> None:
        """What starts generations, and what watches them after LIVE."""
        settings, reactor, roster = self._settings, self._reactor, self._roster
        family, lineage, planner = self._family, self._lineage, self._planner
        keeper = self._gatekeeper
        self._launcher = Launcher(settings, reactor, roster, family, lineage, self.current, keeper)
        self._recovery = Recovery(
            settings, reactor, roster, family, planner, self._batches, self.current, lineage
        )
        self._rollbacks = Rollbacks(settings, reactor, roster, planner, lineage, self._telemetry)
        self._probation = Probation(settings, reactor, health, lineage, self._rollbacks)

    def _assemble_reexec(
        self, control: ControlServer | None, status_fd: int | None, execs: bool
    ) -> None:
        """Re-exec in place: what crosses the exec, and the descriptors that must."""
        self._parts = CoreParts(
            self._reactor, self._roster, self._batches, self._recovery, self._lineage,
            self._probation, self._gatekeeper, self._family, self._launcher,
        )  # fmt: skip
        named = {"control": control.fileno() if control is not None else None, "status": status_fd}
        inherited = {name: fd for name, fd in named.items() if fd is not None}
        notifier = self._telemetry.notifier
        self._reexec = Reexec(self._parts, self._planner, inherited, notifier, execs=execs)

    def _assemble_deciders(self, family: EnvoyFacts, telemetry: Telemetry) -> None:
        """The modules that decide with the supervisor share its planner and batches;
        they reach back to it only through the `Hooks` they declare."""
        settings, reactor, roster = self._settings, self._reactor, self._roster
        self._exits = ExitPolicy(
            settings,
            reactor,
            roster,
            family,
            telemetry,
            self._planner,
            self._batches,
            self._recovery,
            self._launcher,
            self._gatekeeper,
            self._triggers,
            self,
        )
        self._launcher.exec_failed = self._exits.exec_failed
        self._check_ahead = CheckAhead(
            self._gatekeeper, self._watching, roster, self._planner, self._batches, family, reactor
        )
        self._intake = Intake(
            settings,
            reactor,
            roster,
            self._batches,
            self._planner,
            self._gatekeeper,
            self._watching,
            self._triggers,
            self._recovery,
            family,
            self,
            self._check_ahead,
        )
        self._ready_start = ReadyStart(
            settings,
            reactor,
            roster,
            self._gatekeeper,
            self._check_ahead,
            self._triggers,
            family,
            self._processes,
            self,
        )
        self._control_requests = ControlRequests(
            self._desk, self._batches, self, self._rollbacks, self._gatekeeper.gate, self._reexec
        )

    # -- public ---------------------------------------------------------------
    def run(
        self,
        handover: Handover | None = None,
        started: Callback = _nothing,
        early: EarlyEpoch0 | None = None,
    ) -> ExitCode:
        """Start epoch 0 (or adopt the family a previous image handed over) and
        supervise until stopped; `started` once the start-up checks passed."""
        try:
            if handover is not None:
                started()
                self.begin_adopted(handover)
            else:
                self.begin(started, early)
            while True:
                events = self._reactor.poll()
                with batched_output():
                    code = self.handle(events)
                if code is not None:
                    return code
        finally:
            self._gatekeeper.gate.abandon()
            self._processes.release()
            self._shutdown.kill_leftovers()

    def begin(self, started: Callback = _nothing, early: EarlyEpoch0 | None = None) -> None:
        """Start-up: the start-up check, epoch 0, then the walk of the watched trees.

        Envoy first (issue 16): epoch 0 does not wait for a 100,000-file walk, nor, when
        `head_start.py` spawned it (`early`), for this daemon's imports. A change
        made between its spawn and the watch on its directory is found by its ctime
        (`changed_since.py`); the first restart waits for the files to be read. A walk
        that hits an inotify limit still fails start-up: `run()` stops epoch 0 on the
        way out."""
        self._gatekeeper.check_before_first_start(early)
        started()
        watching = self._watching
        if watching is not None:
            watching.before_first_spawn(early.mark if early is not None else None)
        self._launcher.start(0, "startup", first=True, config=self._gatekeeper.config)
        self._open_readers(background=True, pin=self._gatekeeper.first_pin)
        if watching is not None:
            watching.changes.start_building()

    def begin_adopted(self, handover: Handover) -> None:
        """A re-exec: take over the family the previous image ran, then rescan once (a
        change made while nobody watched is a request like any other)."""
        self._open_readers()
        adopt_family(self._parts, handover, self.current(), self.request_restart)
        self._ever_served = True
        self._telemetry.notifier.send(MAINPID=str(os.getpid()))
        self._telemetry.serving_again(self.status_text())

    def _open_readers(self, *, background: bool = False, pin: str | None = None) -> None:
        """The first config's facts come from the gate's reader, parsed in a child (at
        start-up alongside the check) rather than in the daemon."""
        if self._watching is not None:
            first = self._gatekeeper.config
            path = first.path if first is not None else self._settings.config
            facts = self._gatekeeper.gate.facts_before_loop(path) if path else None
            self._watching.start(background=background, pin=pin, facts=facts)
        for reader in (self._control, self._health, self._live_answers):
            if reader is not None:
                self._reactor.add_reader(reader.fileno(), reader)

    def handle(self, events: list[Event]) -> ExitCode | None:
        """Handle one poll's events; the exit code once the daemon is done."""
        starting_up = not self._ever_served
        for event in events:
            self._containment.run(self._dispatch, event, starting_up=starting_up)
            self._containment.run(self._advance, event, starting_up=starting_up)
            self._containment.run(self._settle_ahead, event, starting_up=starting_up)
            self._containment.run(self._look_ahead, event, starting_up=starting_up)
            code = self._shutdown.exit_code
            if code is not None:
                self._containment.run(self._publish, event, starting_up=False)
                return code
        self._containment.run(self._publish, None, starting_up=False)
        return None

    @property
    def state(self) -> SupervisorState:
        if self._shutdown.stopping:
            return SupervisorState.STOPPING
        serving, starting = self._roster.serving(), self._roster.starting()
        if serving is None:
            return SupervisorState.STARTING if starting else SupervisorState.RECOVERING
        if self._gatekeeper.gate.busy:
            return SupervisorState.VALIDATING
        return SupervisorState.RESTARTING if starting else SupervisorState.SERVING

    @property
    def stopping(self) -> bool:
        return self._shutdown.stopping

    @property
    def ever_served(self) -> bool:
        return self._ever_served

    @property
    def plan(self) -> Plan | None:
        return self._planner.plan

    @property
    def reexec(self) -> Reexec:
        return self._reexec

    @property
    def roster(self) -> Roster:
        return self._roster

    @property
    def batches(self) -> Batches:
        return self._batches

    @property
    def triggers(self) -> Triggers:
        return self._triggers

    @property
    def internal_errors(self) -> list[BaseException]:
        return self._containment.errors

    def request_restart(
        self, reason: str, changed: list[str] | None = None, events: int | None = None
    ) -> int:
        """Queue a hot restart; returns its number (answered by the batch covering it)."""
        if self._shutdown.stopping:
            return self._batches.add(reason)[0]
        return self._intake.request(reason, changed, events)

    def _heal(self) -> None:
        """After a contained error: re-arm what a half-run handler may have left."""
        if not self._shutdown.stopping:
            self._launcher.rearm()

    # -- dispatch -------------------------------------------------------------
    def _dispatch(self, event: Event | None) -> None:
        match event:
            case None:
                pass
            case SignalReceived(signum=signum):
                self._on_signal(signum)
            case FdReady(key=Generation() as gen):
                self._launcher.pump_output(gen)
            case FdReady(key=ControlServer() as server):
                self._desk.accept_all(server)
            case FdReady(key=ControlConnection() as conn):
                self._control_requests.on_readable(conn)
            case FdReady(key=key):
                self._on_fd(key)
            case DeadlineReached(key=Timer() as timer) if self._reactor.claim(event):
                self._on_timer(timer)
            case DeadlineReached():
                pass  # stale, or not ours
            case _:
                assert_never(event)

    def _on_fd(self, key: Hashable) -> None:
        watching = self._watching
        if watching is not None and key is watching.changes:
            watching.on_readable()
        elif self._gatekeeper.gate.owns(key):
            self._gatekeeper.gate.on_output(key)
        elif self._health is not None and key is self._health:
            self._probation.on_observation()
        elif self._reexec.owns(key):
            self._reexec.on_output(key)
        elif self._live_answers is not None and key is self._live_answers:
            self._live_answers.drain()
            if self._reactor.has_deadline(Timer.PROBE):  # a start waits for LIVE: ask now
                self._reactor.set_timeout(Timer.PROBE, 0)

    def _on_signal(self, signum: signal.Signals) -> None:
        match signum:
            case signal.SIGTERM | signal.SIGINT:
                self.begin_stop(f"received {signum.name}", ExitCode.CLEAN_STOP)
            case signal.SIGCHLD:
                self._reap()
            case signal.SIGHUP:
                self.request_restart("SIGHUP")
            case signal.SIGUSR1:
                self._launcher.forward(signal.SIGUSR1)
            case signal.SIGUSR2:
                self._reexec.request("SIGUSR2")
            case _:
                log_event(logger, logging.DEBUG, "signal.ignored", signal=signum.name)

    def _on_timer(self, timer: Timer) -> None:
        match timer:
            case Timer.PROBE:
                live = self._launcher.probe()
                if live is not None:
                    self.on_live(live)
            case Timer.START_DEADLINE:
                self._on_start_deadline()
            case Timer.RETRY | Timer.ADVANCE | Timer.HUNG_DRAIN:
                pass  # _advance() runs after every event
            case Timer.CHECK_AHEAD:
                pass  # _look_ahead() runs after every event
            case Timer.DRAIN_WAIT:
                self._intake.on_drain_wait_over()
            case Timer.ORPHAN_KILL:
                self._recovery.kill_orphans()
            case Timer.TERM_WAIT:
                self._shutdown.kill_remaining()
            case Timer.PARENT_LEAVING:
                self._shutdown.parent_grace_over()
            case Timer.KILL_WAIT:
                self._shutdown.kill_timed_out()
            case Timer.HEALTH_ROUND:
                self._probation.next_round()
            case Timer.PROBATION_END:
                self._probation.passed()
            case Timer.DEBOUNCE:
                self._ready_start.fire(self._shutdown.stopping or self._reexec.wanted is not None)
                self._intake.on_burst_due()
            case Timer.COMMAND_DEADLINE:
                self._gatekeeper.gate.on_deadline()
            case Timer.SELF_TEST_DEADLINE:
                self._reexec.on_deadline()
            case Timer.CONTROL_IDLE:
                self._desk.drop_idle()
            case Timer.STANDBY:
                if not self._shutdown.stopping:
                    self._processes.prepare()
            case _:
                assert_never(timer)

    def _settle_ahead(self, _event: Event | None) -> None:
        self._ready_start.settle()  # the event that fired a start ahead took it

    def _look_ahead(self, _event: Event | None) -> None:
        self._check_ahead.after_event(self._shutdown.stopping or self._reexec.wanted is not None)

    # -- watching -------------------------------------------------------------
    def current(self) -> Snapshot | None:
        return self._watching.current() if self._watching is not None else None

    # -- what to start next -----------------------------------------------------
    def _advance(self, _event: Event | None = None) -> None:
        """Start the next generation if one is wanted and allowed now (gunicorn's
        `manage_workers`: a few questions, each answered by a method of its own)."""
        if self._shutdown.stopping or self._shutdown.exit_code is not None:
            return
        self._reexec.tick()
        if self._roster.starting() is not None:
            return
        serving = self._roster.serving()
        if serving is None:
            order = self._recovery.recover(backing_off=self._reactor.has_deadline(Timer.RETRY))
            if order is not None:
                self._launcher.start(
                    order.epoch,
                    order.reason,
                    parent=order.parent,
                    covers_seq=order.covers_seq,
                    config=order.config,
                )
            return
        if serving.marks.stop_reason is not None or self._gatekeeper.gate.busy:
            return  # a full restart is under way, or requests wait for the gate, as one
        queued = bool(self._batches.queued)
        if (
            queued
            and not self._intake.absorb_requests()
            and not self._intake.take_requests(serving)
        ):
            return
        if self._planner.plan is None and not queued:
            self._rollbacks.resume(serving)
        plan = self._planner.plan
        if not isinstance(plan, StartNext):
            self._reactor.cancel(Timer.DRAIN_WAIT)
            self._planner.drain_wait_over = False
            return
        if self._reactor.has_deadline(Timer.RETRY) or self._intake.changed_since_validated(plan):
            return  # a retry waits out its backoff; changed content goes to the gate
        if serving.marks.doomed:
            # Its parent died early: a hot restart from it would hang (measured). The
            # validated request is carried out as a stop and a cold start instead.
            self._recovery.full_restart(serving, plan)
            return
        if self._roster.socket_taken(serving):
            self._recovery.stop_hung_drains(serving)
            return  # a cut drain is ending; its exit wakes us again
        if self._intake.must_wait_for_drain():
            return
        self._start_next(serving, plan)

    def _start_next(self, serving: Generation, plan: StartNext) -> None:
        self._planner.replan(None, "started")
        self._planner.drain_wait_over = False
        for draining in self._roster.draining():
            # A third process makes the serving one end this drain at once (§8).
            self._roster.mark_drain_cut(draining)
        self._reactor.cancel(Timer.RETRY)
        self._reactor.cancel(Timer.DRAIN_WAIT)
        self._launcher.start(
            serving.epoch + 1,
            plan.reason,
            parent=serving,
            covers_seq=plan.seq,
            content=plan.content,
            config=plan.config,
        )

    # -- recovery ---------------------------------------------------------------

    # -- the gate's verdicts -----------------------------------------------------

    # -- starting -------------------------------------------------------------
    def on_live(self, gen: Generation) -> None:
        """`gen` serves: what it means for requests, pacing and systemd."""
        self._launcher.went_live(gen)
        self._rollbacks.on_live(gen)
        self._probation.on_live(gen)
        self._lineage.sync()  # durable once LIVE, not while Envoy starts (lineage.py)
        self._ever_served = True
        self._triggers.abandoned_digest = None
        self._planner.hot_failures = 0
        self._recovery.served_again()
        reply = ControlReply(True, f"serving ({gen.reason})", gen.epoch)
        if gen.covers_seq and self._batches.in_flight:
            self._batches.finish(
                "success",
                gen.reason,
                seq=gen.covers_seq,
                status=self.status_text(),
                epoch=gen.epoch,
                message=reply.message,
            )
        else:
            self._batches.served_without_batch(self.status_text(), gen.covers_seq, reply)
        # The next restart's spawn made ahead (standby.py: a fork, the first time a
        # survey of the shell), in a turn of its own: once the LIVE is published.
        self._reactor.set_timeout(Timer.STANDBY, 0)

    def _on_start_deadline(self) -> None:
        gen = self._roster.starting()
        if gen is None:
            return
        if self._launcher.took_over(gen):
            self.on_live(gen)
            return
        self._launcher.give_up(gen)

    # -- exits ----------------------------------------------------------------
    def _reap(self) -> None:
        for gen in self._roster.alive():
            if gen.process.poll() is not None:
                # Each exit contained on its own: a bug in one must not leave the
                # others unseen until some later SIGCHLD.
                self._containment.run(self._exit_handler(gen), None, starting_up=True)
        gate = self._gatekeeper.gate
        outcome = gate.poll()
        if outcome is not None:
            self._intake.on_preflight_done(outcome)
        self._reexec.on_sigchld()
        # As PID 1 (a container without an init) orphans are reparented to us; reap
        # what is not ours so zombies do not pile up (REVIEW-core finding 14).
        ours = {g.pid for g in self._roster.alive()} | gate.child_pids()
        self._processes.reap_strays(ours | self._reexec.child_pids())

    def _exit_handler(self, gen: Generation) -> Callable[[Event | None], None]:
        return lambda _event: self._on_exited(gen)

    def _on_exited(self, gen: Generation) -> None:
        self._launcher.pump_output(gen)  # its last words, for the failure's log line
        self._probation.on_exited(gen, describe_exit(gen.returncode or 0))
        if self._exits.on_exited(gen):
            self._shutdown.finish_if_done()

    # -- stopping -------------------------------------------------------------
    def begin_stop(self, reason: str, floor: ExitCode) -> None:
        self._reexec.abandon()
        self._shutdown.stop(reason, floor, self.status_text)

    # -- control socket and status -------------------------------------------

    def unchanged_reply(self) -> ControlReply | None:
        return self._intake.unchanged_reply()

    def status_snapshot(self) -> dict[str, object]:
        return self._view.snapshot(self.state, self._gatekeeper.binary)

    def status_text(self) -> str:
        return self._view.line(self.state)

    def _publish(self, _event: Event | None = None) -> None:
        self._view.publish(self.state, self._gatekeeper.binary)


def log_traps(settings: Settings) -> None:
    """What `--check` would warn about (another family on our base id, hot restart
    disabled, a single-file bind mount...), once, as the daemon starts."""
    for trap in startup_traps(settings):
        if trap.level != "info":
            level = logging.ERROR if trap.level == "error" else logging.WARNING
            log_event(logger, level, "startup.trap", trap.message, topic=trap.topic)


def run(
    settings: Settings,
    changes: Content | None = None,
    *,
    telemetry: Telemetry | None = None,
    control: ControlServer | None = None,
    status_fd: int | None = None,
    handover: Handover | None = None,
    started: Callback = _nothing,
    lineage: Lineage | None = None,
    processes: Processes | None = None,
    early: EarlyEpoch0 | None = None,
) -> ExitCode:
    """Supervise until stopped; the reactor's signal handlers live exactly this long.
    `started` runs once the start-up checks passed (the CLI's `daemon.started`). A
    `lineage` given is the caller's to close (`head_start.py` opened it to pin), as
    are `processes`, holding epoch 0 if it was spawned there (`early`)."""
    telemetry = telemetry or Telemetry()  # the loop's turns are timed into its metrics
    with RealReactor(on_busy=telemetry.loop_turned) as reactor, contextlib.ExitStack() as stack:
        if lineage is None:
            lineage = open_lineage(settings)
            stack.callback(lineage.close)
        family = EnvoyFamily(settings)
        stack.callback(family.live_answers.close)
        health = None
        if lineage.enabled and settings.health_window_s > 0:
            health = HealthProber(settings.health_urls, family.admin_address)
            stack.callback(health.close)
        if changes is not None:
            stack.callback(changes.close)
        supervisor = Supervisor(
            settings,
            reactor,
            changes,
            telemetry=telemetry,
            control=control,
            family=family,
            lineage=lineage,
            health=health,
            live_answers=family.live_answers,
            status_fd=status_fd,
            processes=processes,
        )

        def announce() -> None:
            started()
            lineage.announce()
            if handover is None:
                log_traps(settings)

        return supervisor.run(handover, announce, early)
