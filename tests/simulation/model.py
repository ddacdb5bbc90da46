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
ADMIN_TAKEOVER_S: Final = 0.06  # §15: a new epoch answers admin ~60 ms after it starts
FAIL_AFTER_S: Final = 0.05  # §3: a bad config or a refused hot restart exits 1 in ~50 ms
PORT_FAIL_AFTER_S: Final = 0.07  # §3: a port held by another process
ABORT_NO_PARENT_S: Final = 10.1  # §4, §5: ten 1 s retries, then SIGABRT
# §6 and measured (tests/envoy/test_conformance.py): an Envoy that sends a message to a
# process that is gone (its dead parent; a dead child it owes an answer) retries ten
# times 1 s apart on its main thread, then SIGABRTs. Its workers keep serving meanwhile,
# and TERM, INT and USR1 wait (Envoy handles them on that thread), so it dies of the abort.
ABORT_AFTER_PARENT_KILLED_S: Final = 10.0
CRASH_EXIT_S: Final = 0.02  # measured: SIGABRT/SIGSEGV from outside: a backtrace, then death
# Measured: signals Envoy turns into a backtrace and then dies of (rc -signum).
FATAL_SIGNALS: Final = frozenset(
    {signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}
)
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
    # Seconds it stays PRE_INITIALIZING before LIVE: a config waiting for CDS from an xDS
    # server that does not answer stays so until its initial_fetch_timeout (§8, §15).
    init_s: float = 0.0
    # Validates and goes LIVE, but fails probation: its routes answer 503 (the health
    # gate of issue "Generations"; Envoy itself is fine with it).
    healthy: bool = True

    @property
    def digest(self) -> str:
        slow = f"-init{self.init_s:g}" if self.init_s else ""
        sick = "" if self.healthy else "-sick"
        return f"v{self.version}-{'good' if self.good else 'bad'}{slow}{sick}"


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
    # It told its parent to exit (§2 at the parent-shutdown time, §8 when its own child
    # starts, measured on SIGTERM), or tried to: Envoy does it once.
    asked_parent: bool = False
    # Its child told it to exit and the exit is under way. Measured (CI, a SIGTERM to the
    # parent right after its TERMed child exited): Envoy drops its signal handlers on the
    # way out, so a SIGTERM in that window kills it (rc -15) instead of being caught.
    leaving: bool = False
    retrying: bool = False  # in the retry loop of ABORT_AFTER_PARENT_KILLED_S
    owes_dead_child: int | None = None  # the epoch of a child that died HUNG on it (§7)
    wedged: bool = False  # ignores everything but SIGKILL (§7)
    pending_exit: tuple[int, str] | None = None  # what it would have done, had it run
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
    successor_alive: bool  # the epoch started from it (its child) is alive (§6)
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

    def admin_answerer(self) -> Proc | None:
        """Who answers a fresh connection to the family's admin port: the newest epoch,
        from ~60 ms after its start even while it initializes (§15); a hung one never
        got that far (§7)."""
        answering = [
            p
            for p in self.procs
            if p.state in (ProcState.LIVE, ProcState.DRAINING)
            or (p.state is ProcState.INITIALIZING and self.now - p.started_at >= ADMIN_TAKEOVER_S)
        ]
        return max(answering, key=lambda p: p.started_at) if answering else None

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
        proc.leaving = False

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
        if parent.parent_killed_early or parent.retrying:
            # Measured: the doomed parent tells its dead parent to exit as this child
            # starts (§8), so its retry loop runs from now (SIGABRT ~10 s later), and the
            # child, never answered, hangs for ever with the flag stuck, even after the
            # parent's abort.
            self._ask_parent_to_exit(parent, GRANDPARENT_CUT_S, "cut")
            proc.state = ProcState.HUNG
            proc.hung_for_good = True
            return
        if self.parent_unresponsive:
            proc.state = ProcState.HUNG  # §7: blocks in recvmsg, no timeout
            return
        self._ask_parent_to_exit(parent, GRANDPARENT_CUT_S, "cut")  # §8: at once
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
            self._at(live_after_s + proc.content.init_s, proc, lambda: self._go_live(proc))

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

            def drained() -> None:  # §2: the child asks at its parent-shutdown time
                proc.asked_parent = True
                self._exit(parent, 0, "drained")

            self._at(self.parent_shutdown_s, parent, drained)

    # -- signals ----------------------------------------------------------------------
    def send_signal(
        self,
        proc: Proc,
        signum: signal.Signals,
        *,
        stopping: bool,
        planned: Callable[[int], bool],
    ) -> None:
        """A signal from the supervisor: recorded for the invariants, then delivered.
        `planned(pid)`: the supervisor had decided to stop that process."""
        if not proc.alive:
            return
        # Its successor counts only if it is to go on: when the whole family is being
        # stopped (recovery to epoch 0), nobody is left to abort (§6).
        successor = any(p.alive and p.parent is proc and not planned(p.pid) for p in self.procs)
        serving = proc is self.serving()
        self.signals.append(
            SignalSent(
                self.now,
                proc.pid,
                signum,
                proc.state,
                serving,
                successor,
                stopping,
                planned(proc.pid),
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
            case signal.SIGTERM | signal.SIGINT:
                self._terminate(proc, signum)
            case signal.SIGUSR1 if proc.state in (ProcState.INITIALIZING, ProcState.HUNG):
                # §11: before Envoy installs its handlers the default action kills it.
                self._exit(proc, -signal.SIGUSR1, "killed")
            case _ if signum in FATAL_SIGNALS:
                self._at(CRASH_EXIT_S, proc, lambda: self._exit(proc, -signum, "crashed"))
            case _:
                pass  # SIGUSR1 reopens logs; SIGHUP is eaten (§11)

    def _terminate(self, proc: Proc, signum: signal.Signals) -> None:
        """SIGTERM or SIGINT (§2: exits within 10 ms, rc 0, no drain)."""
        if proc.state is ProcState.HUNG:
            # Measured: still in the hot-restart handshake, before Envoy installs its
            # handlers: the default action kills it at once (rc -15).
            self._exit(proc, -signum, "signalled")
            return
        if proc.retrying:
            return  # measured: it waits on the blocked main thread, then dies of the abort
        if proc.leaving:
            self._exit(proc, -signum, "signalled")
            return
        if proc.wedged:
            # Stopped: it asks nothing; `_exit` keeps the exit pending until it runs.
            self._at(TERM_EXIT_S, proc, lambda: self._exit(proc, 0, "terminated"))
            return
        # Measured: on the way out a hot-restarted Envoy tells its parent to exit, LIVE
        # or draining (§6: "shutting down due to child request", ~20 ms later); a parent
        # already gone makes it retry and abort ~10 s later instead.
        if self._ask_parent_to_exit(proc, CHILD_REQUEST_EXIT_S, "child_request"):
            self._at(TERM_EXIT_S, proc, lambda: self._exit(proc, 0, "terminated"))

    def _ask_parent_to_exit(self, proc: Proc, after_s: float, cause: str) -> bool:
        """`proc` tells its parent to exit; Envoy does it once (`asked_parent`). False
        when the parent is gone: `proc` retries, then aborts."""
        parent = proc.parent
        if parent is None or proc.asked_parent:
            return True
        proc.asked_parent = True
        if not parent.alive:
            self._retry_then_abort(proc, "abort_parent_gone")
            return False
        parent.leaving = True
        self._at(after_s, parent, lambda: self._exit(parent, 0, cause))
        return True

    def _retry_then_abort(self, proc: Proc, cause: str) -> None:
        """A message to a process that is gone: see ABORT_AFTER_PARENT_KILLED_S."""
        if proc.retrying:
            return
        proc.retrying = True

        def abort() -> None:
            self._exit(proc, -signal.SIGABRT, cause)

        self._at(ABORT_AFTER_PARENT_KILLED_S, proc, abort)

    def _exit(self, proc: Proc, returncode: int, cause: str) -> None:
        if proc.alive and proc.wedged and cause != "killed":
            proc.pending_exit = (returncode, cause)  # once it runs again
            return
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
                # Measured: blocked in recvmsg for its parent's answer, it stays blocked
                # when the parent dies: no retry, no abort (unlike §5's start without a
                # parent); only a signal ends it.
                child.hung_for_good = True
            elif (
                was is ProcState.DRAINING
                and not child.asked_parent
                and child.live_at is not None
                and not child.parent_killed_early
            ):
                self._doom(child)
        hung = was is ProcState.HUNG and not proc.hung_for_good
        if hung and proc.parent is not None and proc.parent.alive:
            # Measured: the unresponsive parent answers the dead child once it runs again.
            proc.parent.owes_dead_child = proc.epoch
        if was is ProcState.LIVE and proc.parent is not None and proc.parent.alive:
            parent = proc.parent
            if parent.state is ProcState.DRAINING and not parent.leaving:
                # Measured: the serving child died while its parent drains: the parent
                # refuses connections and never exits by itself. (A TERMed child asked
                # it to exit first, §6: that exit goes ahead.)
                self._cancel(parent)
                parent.parent_exit_cancelled = True

    def _doom(self, child: Proc) -> None:
        """§6: the successor of a parent killed early aborts at LIVE + parent-shutdown +
        10 s: at its parent-shutdown time it tells the dead parent to exit, retries, and
        aborts (sooner when it is TERMed or its own child starts before then)."""
        assert child.live_at is not None
        child.parent_killed_early = True
        at = child.live_at + self.parent_shutdown_s

        def ask() -> None:
            self._ask_parent_to_exit(child, 0.0, "drained")

        self._at(max(0.0, at - self.now), child, ask)

    # -- the shared-memory flag -----------------------------------------------------------
    def clear_flag(self) -> None:
        if any(p.alive and p.holds_flag for p in self.procs):
            self.flag_cleared_under_initializer = True
        self.flag = False

    def wedge(self, proc: Proc) -> None:
        """A process that stops responding (SIGSTOP, a deadlock): only SIGKILL ends it."""
        proc.wedged = True

    def unwedge_all(self) -> None:
        """SIGCONT: every wedged process runs again and does what it missed."""
        for proc in self.alive():
            if not proc.wedged:
                continue
            proc.wedged = False
            pending = proc.pending_exit
            if pending is not None:
                self._exit(proc, pending[0], pending[1])
            elif proc.state is ProcState.DRAINING and not self._scheduled(proc):
                self._drain_soon(proc)

    def _drain_soon(self, proc: Proc) -> None:
        self._at(TERM_EXIT_S, proc, lambda: self._exit(proc, 0, "drained"))

    def _scheduled(self, proc: Proc) -> bool:
        return any(h.proc is proc for h in self._timeline)

    def _answer_gone_child(self, proc: Proc, epoch: int) -> None:
        """Measured (conformance scenario child_hung_on_frozen_parent): a parent that runs
        again answers the child that died HUNG on it (killed at its start timeout). The
        answer is refused, so it retries once a second on its main thread, still serving,
        signals waiting, and a child started from it meanwhile hangs behind it. A child of
        the same epoch alive at a retry (the daemon's retry) binds the same socket and
        gets the stale answer: it aborts on it (`replyIsExpectedType`), and the parent goes
        on. Nobody there at the tenth retry: the parent aborts, and nothing serves."""
        proc.retrying = True

        def attempt(left: int) -> None:
            same_socket = [
                p for p in self.procs if p.alive and p is not proc and p.epoch % 3 == epoch % 3
            ]
            if same_socket:
                proc.retrying = False
                victim = same_socket[-1]
                self._at(
                    CRASH_EXIT_S, victim, lambda: self._exit(victim, -signal.SIGABRT, "crashed")
                )
            elif left > 1:
                self._at(1.0, proc, lambda: attempt(left - 1))
            else:
                self._exit(proc, -signal.SIGABRT, "abort_child_gone")

        self._at(1.0, proc, lambda: attempt(10))

    def unresponsive(self, on: bool) -> None:
        """§7: a parent that does not answer (SIGSTOP); when it answers again, every hung
        child goes on and goes LIVE, except behind a parent that first answers a child
        that died meanwhile (`_answer_gone_child`)."""
        self.parent_unresponsive = on
        if on:
            return
        for proc in self.alive():
            if proc.owes_dead_child is not None:
                self._answer_gone_child(proc, proc.owes_dead_child)
                proc.owes_dead_child = None
        for proc in self.procs:
            if proc.parent is not None and proc.parent.retrying:
                continue
            if proc.state is ProcState.HUNG and not proc.hung_for_good:
                proc.state = ProcState.INITIALIZING
                self._start_config(proc, 0.015)
