"""A modelled Envoy hot-restart family, following ../shared/ENVOY_FACTS.md.

The one place where Envoy is a model (DESIGN-core §3). Each rule below cites the fact it
follows; `tests/envoy/test_conformance.py` runs the same scenarios on the real binary so
the model cannot drift from what Envoy does.

The model is a timeline: every process has scheduled happenings (goes LIVE, exits,
aborts) at virtual instants, fired by `EnvoyModel.fire_due(now)`. It also keeps the
evidence the invariants need: who signalled whom and when, what content each process
started with, and how each one ended.
"""

from __future__ import annotations

import enum
import itertools
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

LIVE_AFTER_S: Final = 0.05  # §2: LIVE ~50 ms after the process starts
FAIL_AFTER_S: Final = 0.05  # §3: a bad config or a refused hot restart exits 1 in ~50 ms
PORT_FAIL_AFTER_S: Final = 0.07  # §3: a port held by another process
ABORT_NO_PARENT_S: Final = 10.1  # §4, §5: ten 1 s retries, then SIGABRT
ABORT_AFTER_PARENT_KILLED_S: Final = 10.0  # §6: LIVE + parent-shutdown + 10 s
TERM_EXIT_S: Final = 0.01  # §2: SIGTERM exits within 10 ms, no drain
CHILD_REQUEST_EXIT_S: Final = 0.02  # §6: parent follows a TERMed child 20 ms later
GRANDPARENT_CUT_S: Final = 0.02  # §8: a new epoch's parent terminates its own parent
RESPAWN_LIVE_S: Final = 0.1  # measured: a respawn from a draining parent


class ProcState(enum.Enum):
    INITIALIZING = "initializing"
    LIVE = "live"  # serving; becomes draining when a successor goes LIVE
    DRAINING = "draining"
    HUNG = "hung"  # blocked on an unresponsive parent (§7)
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Content:
    """What a config file holds: a version, and whether Envoy accepts it."""

    version: int
    good: bool = True

    @property
    def digest(self) -> str:
        return f"v{self.version}-{'good' if self.good else 'bad'}"


@dataclass(eq=False)
class Proc:
    pid: int
    epoch: int
    content: Content | None  # None: the config file was missing
    started_at: float
    hot_restart_version: str
    state: ProcState = ProcState.INITIALIZING
    holds_flag: bool = False
    live_at: float | None = None
    returncode: int | None = None
    exit_cause: str = ""
    parent: Proc | None = None
    parent_killed_early: bool = False
    parent_exit_cancelled: bool = False
    hung_for_good: bool = False
    stderr: list[str] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.state is not ProcState.DEAD


@dataclass(frozen=True, slots=True)
class SignalSent:
    at: float
    pid: int
    signum: signal.Signals
    target_state: ProcState
    target_serving: bool  # the newest LIVE process
    successor_alive: bool  # a later epoch of the family is alive
    stopping: bool
    planned: bool  # the supervisor had marked this generation to stop


@dataclass(order=True)
class _Happening:
    at: float
    seq: int
    action: Callable[[], None] = field(compare=False)
    proc: Proc = field(compare=False)


class EnvoyModel:
    """The family of one base id: processes, the shared-memory flag, and the world's
    faults (a port held elsewhere, an unresponsive parent)."""

    def __init__(self, parent_shutdown_s: float = 3.0) -> None:
        self.parent_shutdown_s = parent_shutdown_s
        self.procs: list[Proc] = []
        self.flag = False  # SHMEM_FLAGS_INITIALIZING (§0)
        self.shm_version: str | None = None
        self.port_conflict = False
        self.parent_unresponsive = False
        self.signals: list[SignalSent] = []
        self.max_alive = 0
        self.flag_cleared_under_initializer = False
        self._pids = itertools.count(1000)
        self._seq = itertools.count()
        self._timeline: list[_Happening] = []
        self.on_exit: Callable[[Proc], None] = lambda proc: None
        self.now = 0.0

    # -- queries ----------------------------------------------------------------
    def alive(self) -> list[Proc]:
        return [p for p in self.procs if p.alive]

    def serving(self) -> Proc | None:
        live = [p for p in self.procs if p.state is ProcState.LIVE]
        return max(live, key=lambda p: p.started_at) if live else None

    def by_pid(self, pid: int) -> Proc:
        return next(p for p in self.procs if p.pid == pid)

    def next_at(self) -> float | None:
        pending = [h.at for h in self._timeline if h.proc.alive]
        return min(pending) if pending else None

    # -- time ---------------------------------------------------------------------
    def fire_due(self, now: float) -> None:
        self.now = now
        while True:
            due = [h for h in self._timeline if h.at <= now and h.proc.alive]
            self._timeline = [h for h in self._timeline if h.proc.alive and h not in due]
            if not due:
                return
            for happening in sorted(due):
                if happening.proc.alive:
                    happening.action()

    def _at(self, delay_s: float, proc: Proc, action: Callable[[], None]) -> None:
        self._timeline.append(_Happening(self.now + delay_s, next(self._seq), action, proc))

    def _cancel(self, proc: Proc) -> None:
        self._timeline = [h for h in self._timeline if h.proc is not proc]

    # -- spawning -------------------------------------------------------------------
    def spawn(self, epoch: int, content: Content | None, hot_restart_version: str) -> Proc:
        proc = Proc(next(self._pids), epoch, content, self.now, hot_restart_version)
        self.procs.append(proc)
        self.max_alive = max(self.max_alive, len(self.alive()))
        if epoch == 0:
            self._start_cold(proc)
        else:
            self._start_hot(proc)
        return proc

    def _start_cold(self, proc: Proc) -> None:
        if any(p.alive for p in self.procs if p is not proc):
            # §4, #10902: epoch 0 cannot bind its domain socket while any lives.
            self._fail(proc, FAIL_AFTER_S, 1, "unable to bind domain socket with base_id")
            return
        self.shm_version = proc.hot_restart_version
        self.flag = False  # §0: epoch 0 recreates the segment
        self._start_config(proc, LIVE_AFTER_S)

    def _start_hot(self, proc: Proc) -> None:
        if self.shm_version is not None and proc.hot_restart_version != self.shm_version:
            self._fail(proc, 0.04, -signal.SIGABRT, "Hot restart version mismatch")  # §14
            return
        if self.flag:
            # §3, §8: exits 1 without touching the flag.
            self._fail(proc, FAIL_AFTER_S, 1, "previous envoy process is still initializing")
            return
        same_socket = [
            p for p in self.procs if p.alive and p is not proc and p.epoch % 3 == proc.epoch % 3
        ]
        if same_socket:
            self._fail(proc, FAIL_AFTER_S, 1, "unable to bind domain socket id")  # §4
            return
        self.flag = True
        proc.holds_flag = True
        parents = [p for p in self.procs if p.alive and p.epoch % 3 == (proc.epoch - 1) % 3]
        if not parents or parents[-1].epoch != proc.epoch - 1:
            # §4 (epoch gap), §5 (parent gone): retries, then SIGABRT; flag stays set.
            self._fail(proc, ABORT_NO_PARENT_S, -signal.SIGABRT, "hot restart sendmsg() failed")
            return
        parent = parents[-1]
        proc.parent = parent
        if parent.parent_killed_early:
            # Measured: a hot restart from a doomed epoch hangs for ever, flag stuck.
            proc.state = ProcState.HUNG
            proc.hung_for_good = True
            return
        if self.parent_unresponsive:
            proc.state = ProcState.HUNG  # §7: blocks in recvmsg, no timeout
            return
        if parent.parent is not None and parent.parent.alive:
            grandparent = parent.parent  # §8: terminated at once
            self._at(GRANDPARENT_CUT_S, grandparent, lambda: self._exit(grandparent, 0, "cut"))
        delay = RESPAWN_LIVE_S if parent.parent_exit_cancelled else LIVE_AFTER_S
        self._start_config(proc, delay)

    def _start_config(self, proc: Proc, live_after_s: float) -> None:
        if proc.content is None:
            self._fail(proc, FAIL_AFTER_S, 1, "Invalid path")  # §3: config missing
        elif not proc.content.good:
            self._fail(proc, FAIL_AFTER_S, 1, "error initializing configuration")
        elif self.port_conflict:
            self._fail(proc, PORT_FAIL_AFTER_S, 1, "cannot bind '127.0.0.1:10000'")
        else:
            self._at(live_after_s, proc, lambda: self._go_live(proc))

    def _fail(self, proc: Proc, after_s: float, returncode: int, line: str) -> None:
        def fail() -> None:
            proc.stderr.append(line)
            self._exit(proc, returncode, "failed_start")

        self._at(after_s, proc, fail)

    def _go_live(self, proc: Proc) -> None:
        proc.state = ProcState.LIVE
        proc.live_at = self.now
        if proc.holds_flag:
            proc.holds_flag = False
            self.flag = False  # §0: cleared when it tells its parent to drain
        parent = proc.parent
        if parent is not None and parent.alive:
            parent.state = ProcState.DRAINING
            parent.parent_exit_cancelled = False
            self._cancel(parent)
            shutdown = self.parent_shutdown_s
            self._at(shutdown, parent, lambda: self._exit(parent, 0, "drained"))  # §2

    # -- signals ----------------------------------------------------------------------
    def send_signal(
        self, proc: Proc, signum: signal.Signals, *, stopping: bool, planned: bool
    ) -> None:
        """A signal from the supervisor: recorded for the invariants, then delivered."""
        if not proc.alive:
            return
        successor = any(p.alive and p.epoch > proc.epoch for p in self.procs)
        serving = proc is self.serving()
        self.signals.append(
            SignalSent(
                self.now, proc.pid, signum, proc.state, serving, successor, stopping, planned
            )
        )
        self.deliver(proc, signum)

    def deliver(self, proc: Proc, signum: signal.Signals) -> None:
        """What the process does with a signal, whoever sent it."""
        if not proc.alive:
            return
        match signum:
            case signal.SIGKILL:
                self._exit(proc, -signal.SIGKILL, "killed")
            case signal.SIGTERM:
                self._at(TERM_EXIT_S, proc, lambda: self._terminated(proc))
            case signal.SIGUSR1 if proc.state is ProcState.INITIALIZING:
                # §11: before Envoy installs its handlers the default action kills it.
                self._exit(proc, -signal.SIGUSR1, "killed")
            case _:
                pass  # SIGUSR1 reopens logs; SIGHUP is eaten (§11)

    def _terminated(self, proc: Proc) -> None:
        parent = proc.parent
        self._exit(proc, 0, "terminated")
        if parent is not None and parent.alive and parent.state is ProcState.DRAINING:
            # §6: the draining parent follows its TERMed child ("child request").
            self._at(CHILD_REQUEST_EXIT_S, parent, lambda: self._exit(parent, 0, "child_request"))

    def _exit(self, proc: Proc, returncode: int, cause: str) -> None:
        if not proc.alive:
            return
        was = proc.state
        proc.state = ProcState.DEAD
        proc.returncode = returncode
        proc.exit_cause = cause
        self._cancel(proc)
        # A child that dies holding the flag leaves it stuck (§3).
        proc.holds_flag = False
        self._after_exit(proc, was)
        self.on_exit(proc)

    def _after_exit(self, proc: Proc, was: ProcState) -> None:
        for child in self.procs:
            if child.parent is not proc or not child.alive:
                continue
            if child.state is ProcState.HUNG:
                # §5: a child whose parent is gone retries, then aborts.
                self._fail(child, ABORT_NO_PARENT_S, -signal.SIGABRT, "sendmsg() failed")
            elif (
                was is ProcState.DRAINING
                and proc.exit_cause not in ("drained", "cut")
                and child.live_at is not None
                and not child.parent_killed_early
            ):
                self._doom(child)
        if was is ProcState.LIVE and proc.parent is not None and proc.parent.alive:
            parent = proc.parent
            if parent.state is ProcState.DRAINING:
                # Measured: the serving child died while its parent drains: the parent
                # refuses connections and never exits by itself.
                self._cancel(parent)
                parent.parent_exit_cancelled = True

    def _doom(self, child: Proc) -> None:
        """§6: the successor of a parent killed early aborts at LIVE + parent-shutdown +
        10 s, when it tries to tell the dead parent to exit."""
        assert child.live_at is not None
        child.parent_killed_early = True
        at = child.live_at + self.parent_shutdown_s + ABORT_AFTER_PARENT_KILLED_S

        def abort() -> None:
            self._exit(child, -signal.SIGABRT, "abort_parent_killed")

        self._at(max(0.0, at - self.now), child, abort)

    # -- the shared-memory flag -----------------------------------------------------------
    def clear_flag(self) -> None:
        if any(p.alive and p.holds_flag for p in self.procs):
            self.flag_cleared_under_initializer = True
        self.flag = False

    def unresponsive(self, on: bool) -> None:
        """§7: a parent that does not answer (SIGSTOP); when it answers again, every hung
        child goes on and goes LIVE."""
        self.parent_unresponsive = on
        if on:
            return
        for proc in self.procs:
            if proc.state is ProcState.HUNG and not proc.hung_for_good:
                proc.state = ProcState.INITIALIZING
                self._start_config(proc, 0.015)
