"""The real `Supervisor` in a simulated world, with the invariants of DESIGN-core §3
checked after every event it handles.

`Simulation` is deterministic: the same sequence of calls gives the same run, so a
failure Hypothesis finds replays exactly (TigerBeetle's VOPR idea). Actions are what
the world does to the daemon (writes, signals, deaths, faults); `advance` moves the
virtual clock, firing the model's happenings and the supervisor's deadlines in order.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import signal
import socket
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from envoy_autoreload.control import ControlConnection
from envoy_autoreload.errors import ExitCode
from envoy_autoreload.generations import GenerationStore, Outcome
from envoy_autoreload.handover import Handover
from envoy_autoreload.lineage import Lineage
from envoy_autoreload.notify import Notifier
from envoy_autoreload.settings import Settings
from envoy_autoreload.supervisor import Supervisor
from envoy_autoreload.telemetry import Telemetry
from tests.simulation.model import Content, ProcState
from tests.simulation.world import (
    CONFIG_PATH,
    SimContent,
    SimFacts,
    SimGate,
    SimHealth,
    SimProcesses,
    SimReactor,
    SimWorld,
)

MAX_EVENTS_PER_INSTANT = 2000
# Snapshots are real files; tmpfs keeps thousands of generated runs fast.
SIM_STATE_ROOT = "/dev/shm" if Path("/dev/shm").is_dir() else None
# Invariant 5 leaves out what only generations can pin (REVIEW-core finding 8, issue
# "Generations"): a recovery start reads the files on disk, and without --watch there is
# no digest to compare the validated content with at the start.
RECOVERY_REASONS = frozenset({"recovery"})


class InvariantBroken(AssertionError):
    pass


class RecordingNotifier(Notifier):
    """systemd's side of sd_notify, kept as a list."""

    def __init__(self) -> None:
        super().__init__(None)
        self.sent: list[str] = []

    @property
    def enabled(self) -> bool:
        return True

    def send(self, **fields: str) -> None:
        for key in ("READY", "RELOADING", "STOPPING"):
            if key in fields:
                self.sent.append(key)


@dataclass
class Knobs:
    max_drain_wait_s: float = 60.0
    start_timeout_s: float = 60.0
    parent_shutdown_s: float = 3.0
    term_wait_s: float = 30.0
    validate_timeout_s: float = 30.0
    debounce_s: float = 0.3
    debounce_max_s: float = 5.0
    watch: bool = True
    on_incompatible_binary: Literal["refuse", "restart"] = "refuse"
    generations: bool = True  # a real GenerationStore in a temp dir; probation, rollback
    health_window_s: float = 10.0
    rollback: bool = True
    build_s: float = 0.0  # the first reading of the watched files, after epoch 0 starts


@dataclass
class ControlClient:
    peer: socket.socket
    seq_hint: int
    answer: bytes = b""

    def read(self) -> bytes:
        try:
            while chunk := self.peer.recv(65536):
                self.answer += chunk
        except BlockingIOError:
            pass
        return self.answer


@dataclass
class Simulation:
    knobs: Knobs = field(default_factory=Knobs)

    def __post_init__(self) -> None:
        knobs = self.knobs
        self.world = SimWorld(parent_shutdown_s=knobs.parent_shutdown_s)
        self.notifier = RecordingNotifier()
        self.telemetry = Telemetry(self.notifier)
        self.settings = Settings(
            start_script=Path("/sim/start_envoy.sh"),
            config=CONFIG_PATH,
            watch=(CONFIG_PATH.parent,) if knobs.watch else (),
            envoy=Path("/sim/envoy"),
            term_wait_s=knobs.term_wait_s,
            start_timeout_s=knobs.start_timeout_s,
            max_drain_wait_s=knobs.max_drain_wait_s,
            validate_timeout_s=knobs.validate_timeout_s,
            debounce_s=knobs.debounce_s,
            debounce_max_s=knobs.debounce_max_s,
            on_incompatible_binary=knobs.on_incompatible_binary,
            health_window_s=knobs.health_window_s,
            health_urls=(SimHealth.URL,),
            rollback=knobs.rollback,
        )
        self.content = SimContent(self.world, knobs.debounce_s, knobs.debounce_max_s, knobs.build_s)
        self.gate = SimGate(self.world, knobs.validate_timeout_s)
        self.facts = SimFacts(self.world)
        self.health = SimHealth(self.world)
        self._state_dir: str | None = None
        lineage = None
        if knobs.generations:
            self._state_dir = tempfile.mkdtemp(prefix="sim-state-", dir=SIM_STATE_ROOT)
            store = GenerationStore.open(Path(self._state_dir), keep=10, suffix=".yaml")
            lineage = Lineage(store, self.world.config_bytes)
        self.lineage = lineage
        self.store = store if knobs.generations else None
        self.supervisor = self._new_supervisor()
        self.reexecs = 0
        self.world.stopping = lambda: self.supervisor.stopping
        self.world.planned_stop = self._planned_stop
        self.exit_code: ExitCode | None = None
        self.clients: list[ControlClient] = []
        self._conns: list[ControlConnection] = []
        self.next_version = 1
        self._signals_checked = 0
        self._spawns_checked = 0
        self._reasons: dict[int, str] = {}
        self.stop_requested = False
        self.tolerate_internal_errors = False  # a containment test injects them

    def _new_supervisor(self) -> Supervisor:
        """A core over this world: at the start, and as the new image after a re-exec."""
        knobs = self.knobs
        return Supervisor(
            self.settings,
            self.world.reactor,
            self.content if knobs.watch else None,
            telemetry=self.telemetry,
            processes=SimProcesses(self.world),
            family=self.facts,
            gate=self.gate,
            lineage=self.lineage,
            health=self.health if knobs.generations else None,
            execs=False,  # the re-exec step is `reexec()`, taken by the harness
        )

    def reexec(self) -> bool:
        """The daemon re-executes itself at the next quiet moment: its state serialised
        (as JSON, as in the memfd), and restored into a fresh core over the same world.
        The exec's mechanics (self-test, fds, signal mask) run on the real binary in
        tests/envoy/test_reexec.py. False when no quiet moment is here now."""
        old = self.supervisor
        if self.exited or old.stopping or not old.reexec.quiet():
            return False
        old.reexec.wanted = None
        handover = Handover.from_bytes(old.reexec.export().to_bytes())
        previous = self.world.reactor
        fresh = SimReactor()
        fresh.move_to(previous.now())
        fresh.pending_signals = set(previous.pending_signals)  # blocked across the exec
        self.world.reactor = fresh
        knobs = self.knobs
        self.content = SimContent(self.world, knobs.debounce_s, knobs.debounce_max_s, knobs.build_s)
        self.telemetry = Telemetry(self.notifier)
        self.supervisor = self._new_supervisor()
        self.supervisor.begin_adopted(handover)
        self.reexecs += 1
        self.run_until_quiet()
        return True

    # -- lifecycle ----------------------------------------------------------------
    def begin(self) -> None:
        self.supervisor.begin()
        self._record_reasons()
        self.run_until_quiet()

    def close(self) -> None:
        for client in self.clients:
            client.peer.close()
        for conn in list(self._conns):
            conn.close()
        if self.lineage is not None:
            self.lineage.close()
        if self._state_dir is not None:
            shutil.rmtree(self._state_dir, ignore_errors=True)

    @property
    def now(self) -> float:
        return self.world.reactor.now()

    @property
    def exited(self) -> bool:
        return self.exit_code is not None

    # -- time -----------------------------------------------------------------------
    def advance(self, seconds: float) -> None:
        target = self.now + seconds
        self.run_until_quiet()  # what happened at this instant comes first
        while not self.exited:
            candidates = [
                t
                for t in (
                    self.world.model.next_at(),
                    self.world.reactor.next_deadline(),
                    self.gate.next_at(),
                    self.content.next_at(),
                )
                if t is not None
            ]
            step = min([*candidates, target])
            self.world.reactor.move_to(max(step, self.now))
            self.run_until_quiet()
            if self.supervisor.reexec.wanted is not None:
                self.reexec()  # the core asked for it (a repeated internal error)
            if self.now >= target:
                return

    def run_until_quiet(self) -> None:
        """Handle everything due at this instant; the loop must settle."""
        for _ in range(MAX_EVENTS_PER_INSTANT):
            if self.exited:
                return
            self.world.model.fire_due(self.now)
            self.gate.finish_due(self.now)
            self.content.finish_due(self.now)
            events = self.world.reactor.poll()
            if not events:
                return
            self.exit_code = self.supervisor.handle(events)
            self._record_reasons()
            self.check_safety()
        raise InvariantBroken(f"the loop spins at t={self.now:.3f}: events never stop")

    # -- what the world does ------------------------------------------------------------
    def write_named(self, ok: bool) -> None:
        """The file every config names, changed (an event, as for the config)."""
        self.world.named_ok = ok
        self.content.written()

    def write(self, good: bool = True, healthy: bool = True) -> Content:
        content = Content(self.next_version, good, healthy=healthy)
        self.next_version += 1
        self.world.disk = content
        self.content.written()
        return content

    def revert_to(self, content: Content | None) -> None:
        self.world.disk = content
        self.content.written()

    def delete_config(self) -> None:
        self.world.disk = None
        self.content.written()

    def send(self, signum: signal.Signals) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stop_requested = True
        self.world.reactor.pending_signals.add(signum)
        self.run_until_quiet()

    def control_reload(self, force: bool = False) -> ControlClient:
        return self.control(b"reload --force\n" if force else b"reload\n")

    def control_rollback(self) -> ControlClient:
        """`envoy-autoreloadctl rollback`: to the last good generation."""
        return self.control(b"rollback\n")

    def control(self, request: bytes) -> ControlClient:
        ours, peer = socket.socketpair()
        ours.setblocking(False)
        peer.setblocking(False)
        peer.sendall(request)
        conn = ControlConnection(ours)
        self._conns.append(conn)
        client = ControlClient(peer, self.supervisor.batches.request_seq + 1)
        self.clients.append(client)
        self.world.reactor.ready.append(conn)
        self.run_until_quiet()
        return client

    def kill_proc(self, state: ProcState, signum: signal.Signals = signal.SIGKILL) -> bool:
        """A fault: something outside the daemon kills a process in `state`."""
        procs = [p for p in self.world.model.alive() if p.state is state]
        if not procs:
            return False
        self.world.model.now = self.now
        self.world.model.deliver(procs[-1], signum)
        self.run_until_quiet()
        return True

    # -- invariants -------------------------------------------------------------------
    def _planned_stop(self, pid: int) -> bool:
        return any(
            g.pid == pid and g.marks.stop_reason is not None for g in self.supervisor.roster.alive()
        )

    def _record_reasons(self) -> None:
        for gen in self.supervisor.roster.alive():
            self._reasons.setdefault(gen.pid, gen.reason)

    def check_safety(self) -> None:
        """Invariants 1-6 and 9, after every handled event."""
        self._check_no_internal_error()  # 9
        self._check_signals()  # 1, 2
        model = self.world.model
        if model.max_alive > 3:  # 3
            raise InvariantBroken(f"{model.max_alive} processes of the family were alive")
        if model.flag_cleared_under_initializer:
            raise InvariantBroken("the INITIALIZING flag was cleared under a starting child")
        self._check_spawns()  # 4, 5
        if self.world.discarded_ahead:
            raise InvariantBroken(
                f"a start fired ahead was not the start decided: {self.world.discarded_ahead}"
            )
        self._check_requests()  # 6

    def _check_no_internal_error(self) -> None:
        errors = self.supervisor.internal_errors
        if errors and not self.tolerate_internal_errors:
            text = "".join(traceback.format_exception(errors[0]))
            raise InvariantBroken(f"a handler raised (invariant 9):\n{text}")

    def _check_signals(self) -> None:
        model = self.world.model
        for sent in model.signals[self._signals_checked :]:
            if sent.signum not in (signal.SIGTERM, signal.SIGKILL) or sent.stopping:
                continue
            if sent.target_serving and not sent.planned:
                raise InvariantBroken(f"invariant 1: the serving Envoy was signalled: {sent}")
            if sent.target_state is ProcState.DRAINING and sent.successor_alive:
                raise InvariantBroken(f"invariant 2: a draining parent was signalled: {sent}")
        self._signals_checked = len(model.signals)

    def _check_spawns(self) -> None:
        for spawned in self.world.spawned[self._spawns_checked :]:
            self._check_epoch(spawned.epoch, spawned.alive_epochs)
            reason = self._reasons.get(spawned.pid, "")
            digest = spawned.content.digest if spawned.content is not None else None
            pinned = self.knobs.watch  # without --watch nothing pins content (finding 8)
            if pinned and reason not in RECOVERY_REASONS and digest not in self.gate.passed:
                raise InvariantBroken(
                    f"invariant 5: epoch {spawned.epoch} ({reason}) started {digest}, "
                    f"which never passed the gate"
                )
            window = self.content.build_window
            building = window is not None and window[0] <= spawned.at < (window[1] or math.inf)
            if building and reason not in {*RECOVERY_REASONS, "startup"}:
                raise InvariantBroken(
                    f"invariant 11: epoch {spawned.epoch} ({reason}) started while the files "
                    "were first read: a request must wait for what epoch 0 started from"
                )
        self._spawns_checked = len(self.world.spawned)

    @staticmethod
    def _check_epoch(epoch: int, alive_epochs: tuple[int, ...]) -> None:
        if epoch == 0:
            if alive_epochs:
                raise InvariantBroken(f"invariant 4: epoch 0 while {alive_epochs} alive")
            return
        if epoch - 1 not in alive_epochs or any(e >= epoch for e in alive_epochs):
            raise InvariantBroken(f"invariant 4: epoch {epoch} while {alive_epochs} alive")

    def _check_requests(self) -> None:
        sup = self.supervisor
        batches = sup.batches
        if batches.answered_through >= batches.request_seq or sup.stopping:
            return
        pending = (
            batches.queued
            or sup.plan is not None
            or self.gate.busy
            or sup.roster.starting() is not None
        )
        if not pending:
            raise InvariantBroken(
                f"invariant 6: request {batches.request_seq} is neither answered "
                f"(through {batches.answered_through}) nor pending"
            )

    # -- end states ---------------------------------------------------------------------
    def check_converges(self) -> None:
        """Invariant 7: with good newest content and no faults, it serves that content."""
        world = self.world
        world.model.port_conflict = False
        world.model.unresponsive(False)
        world.model.unwedge_all()
        world.binary_ok = True
        if not world.named_ok:
            self.write_named(True)
        self.gate.hangs = False
        self.gate.duration_s = 0.04
        self.facts.admin_blind = False
        if not self.exited:
            self.send(signal.SIGHUP)  # the operator, after fixing the fault
            self.advance(400.0)
        if self.exited:
            if not self.stop_requested and self.exit_code != ExitCode.CHILD_KILLED:
                raise InvariantBroken(f"exited {self.exit_code} unasked (not the crash budget)")
            return
        serving = world.model.serving()
        if serving is None:
            raise InvariantBroken(f"invariant 7: nothing serves at t={self.now:.1f}")
        disk = world.disk
        if self._rolled_back_from(disk):
            self._check_serves_good(serving.content, disk)
        elif disk is not None and disk.good and serving.content != disk:
            raise InvariantBroken(f"invariant 7: serves {serving.content}, disk has {disk}")
        if self.supervisor.batches.answered_through < self.supervisor.batches.request_seq:
            raise InvariantBroken("invariant 6: requests left unanswered after convergence")

    def outcome(self, content: Content | None) -> Outcome | None:
        if self.store is None or content is None:
            return None
        return self.store.outcome(hashlib.sha256(repr(content).encode()).hexdigest())

    def _rolled_back_from(self, disk: Content | None) -> bool:
        """The files hold a config that failed probation, and a good one exists."""
        store = self.store
        return (
            store is not None
            and self.knobs.rollback
            and self.outcome(disk) is Outcome.FAILED
            and store.last_good() is not None
        )

    def _check_serves_good(self, serving: Content | None, disk: Content | None) -> None:
        """Invariant 10: after a failed probation, what serves passed probation."""
        if self.outcome(serving) is not Outcome.GOOD:
            raise InvariantBroken(
                f"invariant 10: {disk} failed probation, yet {serving} serves "
                f"({self.outcome(serving)}), not a generation that passed"
            )

    def check_stops(self) -> None:
        """Invariant 8: SIGTERM ends with the documented code and no child left."""
        if not self.exited:
            self.send(signal.SIGTERM)
            self.advance(self.knobs.term_wait_s + 10.0)
        assert self.exited, "SIGTERM did not end the daemon"
        alive = self.world.model.alive()
        if alive:
            raise InvariantBroken(f"invariant 8: {len(alive)} children left after exit")
        killed = any(s.signum == signal.SIGKILL and s.stopping for s in self.world.model.signals)
        expected = {ExitCode.CHILD_KILLED}
        if not killed:
            expected.add(ExitCode.CLEAN_STOP)
        if self.exit_code not in expected:
            raise InvariantBroken(f"invariant 8: exit code {self.exit_code}, expected {expected}")
