"""The restarter core: which generation to start, when, and what to do when one fails.

Owns every generation and all restart policy; consumes the reactor's events in the main
thread. Knows nothing about how a restart was asked for (a signal now; file changes
and the control socket later all arrive as `request_restart`).

The rules, each from a measured failure of upstream's hot-restarter.py (ENVOY_FACTS):
- One generation starts at a time (upstream #550); requests that arrive meanwhile are
  queued and any number of them run as one restart.
- A new generation's epoch is the newest *serving* epoch + 1. A failed start does not
  consume its epoch: the retry reuses it, because Envoy epochs must be consecutive
  (§4, istio #35740). With nothing alive we start over at epoch 0.
- A generation serves only when Envoy says so: `/server_info` over a fresh connection
  reports LIVE at that epoch (§9, §15); without admin, the shared-memory flag clears.
- By default a restart also waits until the previous parent has exited: a third
  process makes Envoy cut the oldest one's drain short and reset its connections
  (§8, §10), bounded by --max-drain-wait.
- A failed start never touches the serving generation. Its leftover INITIALIZING flag
  is cleared after it is reaped so the next attempt can hot restart (§3, #726, #33446);
  upstream instead kills everything (#4797).
- We never signal a draining generation during normal operation: its successor would
  abort about 10 s after its parent-shutdown time (§6).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import signal
import subprocess
import time
from pathlib import Path
from typing import Final, assert_never

from envoy_autoreload.admin import fetch_server_info
from envoy_autoreload.backoff import (
    COLD_BACKOFF_CAP_S,
    COLD_BACKOFF_FIRST_S,
    HOT_RESTART_RETRIES,
    HOT_RETRY_FIRST_S,
    CrashBudget,
    exponential_delay,
)
from envoy_autoreload.child import Generation, GenerationState, describe_exit, spawn
from envoy_autoreload.envoy_config import (
    AdminAddress,
    admin_address_from_config,
    parse_admin_address,
)
from envoy_autoreload.envoy_process import executable_of, find_envoy, is_shell
from envoy_autoreload.errors import AutoreloadError, ExitCode, SpawnError
from envoy_autoreload.hot_restart_shm import (
    INITIALIZING,
    ShmUnsupported,
    clear_initializing,
    layout_for,
    read_flags,
    shm_path,
)
from envoy_autoreload.logs import FieldValue, log_event
from envoy_autoreload.loop import DeadlineReached, Event, FdReady, Reactor, SignalReceived
from envoy_autoreload.settings import Settings
from envoy_autoreload.watch.changes import ChangeDetector

logger = logging.getLogger(__name__)

PROC_AVAILABLE: Final = Path("/proc/self/cmdline").exists()
ENVOY_DEFAULT_PARENT_SHUTDOWN_S: Final = 900.0
NO_ADMIN_SETTLE_S: Final = 1.0
KILL_REAP_WAIT_S: Final = 5.0
HOT_RESTART_VERSION_TIMEOUT_S: Final = 5.0
MAX_QUEUED_REASONS: Final = 8
PARENT_DIED: Final = "its parent, the serving epoch, died"


class Timer(enum.Enum):
    """The supervisor's deadlines; at most one of each is armed."""

    PROBE = "probe"  # ask the starting generation whether it is LIVE yet
    START_DEADLINE = "start_deadline"  # --start-timeout for the starting generation
    RETRY = "retry"  # backoff before the next attempt (hot retry or cold start)
    DRAIN_WAIT = "drain_wait"  # --max-drain-wait for the previous parent to exit
    TERM_WAIT = "term_wait"  # --term-wait after SIGTERM to every child
    KILL_WAIT = "kill_wait"  # how long SIGKILLed children get to be reaped
    DEBOUNCE = "debounce"  # a burst of file events is due (quiet window or max wait)


class SupervisorState(enum.Enum):
    """Derived from the generations and timers, for status lines; never stored."""

    STARTING = "starting"
    SERVING = "serving"
    RESTARTING = "restarting"
    BACKING_OFF = "backing_off"
    DOWN = "down"
    STOPPING = "stopping"


class Supervisor:
    """Runs generations of the start script and keeps one of them serving."""

    def __init__(
        self, settings: Settings, reactor: Reactor, changes: ChangeDetector | None = None
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self._changes = changes
        self._generations: list[Generation] = []
        self._requests: list[str] = []
        self._retry_wanted = False
        self._hot_failures = 0
        self._cold_failures = 0
        self._need_cold_start = False
        self._respawn_epoch: int | None = None
        self._cold_reason = "startup"
        self._drain_wait_over = False
        self._crash_budget = CrashBudget()
        self._stopping = False
        self._exit_floor = ExitCode.CLEAN_STOP
        self._exit_code: ExitCode | None = None
        self._hot_restart_versions: dict[str, str] = {}
        self._admin_addresses: dict[int, AdminAddress | None] = {}
        self._warned: set[str] = set()
        self._family_base_id: int | None = None

    # -- public ---------------------------------------------------------------
    def run(self) -> ExitCode:
        """Start epoch 0 and supervise until stopped; always leaves no child behind."""
        try:
            if self._changes is not None:
                self._start_watching(self._changes)
            self._start(0, "startup", first=True)
            while True:
                for event in self._reactor.poll():
                    self._dispatch(event)
                    code = self._exit_code
                    if code is not None:
                        return code
        finally:
            self._kill_leftovers()

    @property
    def state(self) -> SupervisorState:
        if self._stopping:
            return SupervisorState.STOPPING
        serving = self._serving()
        starting = self._starting()
        if serving is None:
            if starting is not None:
                return SupervisorState.STARTING
            return SupervisorState.BACKING_OFF if self._need_cold_start else SupervisorState.DOWN
        if starting is not None:
            return SupervisorState.RESTARTING
        return SupervisorState.SERVING

    def request_restart(self, reason: str, changed: list[str] | None = None) -> None:
        """Queue a hot restart; any number of queued requests run as one."""
        if self._stopping:
            return
        first = not self._requests
        if reason not in self._requests and len(self._requests) < MAX_QUEUED_REASONS:
            self._requests.append(reason)
        # A new request is a new chance: earlier failures no longer count against it.
        self._hot_failures = 0
        if first:
            serving = self._serving()
            self._event(
                logging.INFO,
                "restart.requested",
                reason=reason,
                epoch=serving.epoch if serving else None,
                pid=serving.pid if serving else None,
                changed=changed[:5] if changed is not None else None,
                count=len(changed) if changed is not None else None,
            )
        else:
            self._event(
                logging.DEBUG,
                "restart.coalesced",
                reason=reason,
                queued=len(self._requests),
                changed=changed[:5] if changed is not None else None,
                count=len(changed) if changed is not None else None,
            )

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
            case DeadlineReached(key=key):
                if isinstance(key, Timer):
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
                self._event(logging.DEBUG, "signal.ignored", signal=signum)

    def _on_timer(self, timer: Timer) -> None:
        match timer:
            case Timer.PROBE:
                self._probe()
            case Timer.START_DEADLINE:
                self._on_start_deadline()
            case Timer.RETRY:
                pass  # _advance() starts whatever was waiting for the backoff
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
            case Timer.TERM_WAIT:
                self._kill_remaining()
            case Timer.DEBOUNCE:
                self._on_burst_due()
            case Timer.KILL_WAIT:
                self._event(
                    logging.ERROR,
                    "shutdown.kill_timeout",
                    "children did not go away after SIGKILL",
                    pids=[g.pid for g in self._alive()],
                )
                self._exit_code = ExitCode.CHILD_KILLED
            case _:
                assert_never(timer)

    def _on_stderr(self, gen: Generation) -> None:
        if not gen.pump_stderr():
            fd = gen.stderr_fd()
            if fd is not None:
                self._reactor.remove_reader(fd)
            gen.close_stderr()

    # -- watching -------------------------------------------------------------
    def _start_watching(self, changes: ChangeDetector) -> None:
        snapshot = changes.start()
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
        changes.on_readable(time.monotonic())
        deadline = changes.deadline()
        if deadline is not None:
            self._reactor.set_deadline(Timer.DEBOUNCE, deadline)

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
        reference = self._starting() or self._serving()
        if reference is not None and reference.snapshot is not None:
            if burst.snapshot.digest == reference.snapshot.digest:
                self._event(
                    logging.DEBUG,
                    "restart.skipped",
                    "unchanged, not restarting",
                    reason="unchanged",
                    events=burst.events,
                    epoch=reference.epoch,
                )
                return
            changed = burst.snapshot.changed_since(reference.snapshot)
        else:
            changed = sorted(burst.paths)
        self.request_restart("files_changed", changed)

    # -- what to do next --------------------------------------------------------
    def _advance(self) -> None:
        """Start the next generation if one is wanted and allowed now."""
        if self._stopping or self._exit_code is not None or self._starting() is not None:
            return
        backing_off = self._reactor.has_deadline(Timer.RETRY)
        serving = self._serving()
        if serving is None:
            self._recover(backing_off)
            return
        if serving.doomed:
            if self._requests:
                self._full_restart(serving)
            return
        if not self._requests and not self._retry_wanted:
            return
        if backing_off and not self._requests:
            return
        if self._must_wait_for_drain():
            return
        reason = ",".join(self._requests) or "retry"
        self._requests.clear()
        self._retry_wanted = False
        self._drain_wait_over = False
        for draining in self._in_state(GenerationState.DRAINING):
            # A third process makes the serving one end this drain at once (§8).
            draining.drain_cut_by_restart = True
        self._reactor.cancel(Timer.RETRY)
        self._reactor.cancel(Timer.DRAIN_WAIT)
        self._start(serving.epoch + 1, reason)

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
        if self._respawn_epoch is not None:
            epoch, self._respawn_epoch = self._respawn_epoch, None
            parents = self._in_state(GenerationState.DRAINING)
            if parents:
                # The dead epoch's parent still drains and refuses new connections, and
                # nobody will ever tell it to exit; the same epoch started again from it
                # goes LIVE in ~0.1 s and ends its drain normally (measured).
                self._restore_hot_restart_flag(parents[-1], epoch)
                self._start(epoch, "recovery")
                return
        if not self._need_cold_start:
            return
        orphans = self._alive()
        if orphans:
            # Epoch 0 cannot bind its domain socket while any of the family lives
            # (#10902); a draining parent without a successor serves nothing.
            self._stop_orphans(orphans)
            return
        if backing_off and not self._requests:
            return
        reason = ",".join(self._requests) or self._cold_reason
        self._requests.clear()
        self._need_cold_start = False
        self._reactor.cancel(Timer.RETRY)
        self._start(0, reason)

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
                orphan.send_signal(signal.SIGTERM)

    def _full_restart(self, serving: Generation) -> None:
        """A doomed epoch cannot hot restart (the child hangs, measured); stop it and
        cold-start epoch 0 now instead of at its abort: the same ~0.1 s outage, sooner."""
        if serving.killed_by_us is not None:
            return
        serving.killed_by_us = "full restart: its parent died early, so it cannot hot restart"
        self._event(
            logging.WARNING,
            "restart.full",
            f"{serving.killed_by_us}; stopping it and starting epoch 0 (a short outage)",
            epoch=serving.epoch,
            pid=serving.pid,
        )
        serving.send_signal(signal.SIGTERM)

    # -- starting -------------------------------------------------------------
    def _start(self, epoch: int, reason: str, *, first: bool = False) -> None:
        assert self._starting() is None, "never two starting generations (upstream #550)"
        try:
            gen = spawn(self._settings.start_script, self._settings.script_args, epoch, reason)
        except OSError as err:
            message = f"cannot execute start script {self._settings.start_script}: {err.strerror}"
            if first:
                raise SpawnError(message) from err
            self._event(logging.ERROR, "restart.failed", message, epoch=epoch, cause="exec failed")
            self._after_failed_start(epoch)
            return
        if self._changes is not None:
            gen.snapshot = self._changes.snapshot
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
        if gen.envoy is None and PROC_AVAILABLE:
            gen.envoy = find_envoy(gen.pid)
            if gen.envoy is not None:
                self._family_base_id = self._base_id(gen)
        if self._is_live(gen):
            self._on_live(gen)
            return
        elapsed = time.monotonic() - gen.started_at
        self._reactor.set_timeout(Timer.PROBE, min(0.1, max(0.01, elapsed / 4)))

    def _is_live(self, gen: Generation) -> bool:
        admin = self._settings.admin_address
        if admin is None:
            if gen.envoy is None and PROC_AVAILABLE:
                return False  # the start script has not exec'd Envoy yet
            admin = self._admin_address(gen)
        if admin is not None:
            info = fetch_server_info(admin)
            if info is None or info.state != "LIVE" or info.restart_epoch != gen.epoch:
                return False
            if gen.envoy is not None and info.hot_restart_version:
                self._hot_restart_versions[gen.envoy.exe] = info.hot_restart_version
            return True
        return self._shm_says_live(gen)

    def _shm_says_live(self, gen: Generation) -> bool:
        """Without admin: alive for a moment and, past epoch 0, the INITIALIZING flag clear."""
        if time.monotonic() - gen.started_at < NO_ADMIN_SETTLE_S:
            return False
        if gen.epoch == 0:
            return True
        try:
            layout = layout_for(self._hot_restart_version(gen))
            return not read_flags(shm_path(self._base_id(gen)), layout) & INITIALIZING
        except ShmUnsupported:
            return True

    def _on_live(self, gen: Generation) -> None:
        now = time.monotonic()
        self._reactor.cancel(Timer.PROBE)
        self._reactor.cancel(Timer.START_DEADLINE)
        for old in self._in_state(GenerationState.SERVING):
            old.transition(GenerationState.DRAINING)
            old.draining_since = now
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
                parent.draining_since = now  # a respawned successor restarts its drain
        gen.transition(GenerationState.SERVING)
        gen.serving_at = now
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
        self._check_start_script_execs(gen)

    def _on_start_deadline(self) -> None:
        gen = self._starting()
        if gen is None:
            return
        gen.killed_by_us = f"not LIVE within --start-timeout {self._settings.start_timeout_s:g} s"
        self._event(
            logging.WARNING, "child.start_timeout", gen.killed_by_us, epoch=gen.epoch, pid=gen.pid
        )
        # A child can wait forever on an unresponsive parent (§7); kill it by its own PID.
        gen.process.kill()

    # -- exits ----------------------------------------------------------------
    def _reap(self) -> None:
        for gen in self._alive():
            if gen.poll() is not None:
                self._on_exited(gen)

    def _on_exited(self, gen: Generation) -> None:
        self._on_stderr(gen)
        previous = gen.transition(GenerationState.EXITED)
        self._generations.remove(gen)
        self._admin_addresses.pop(id(gen), None)
        assert gen.returncode is not None
        status = describe_exit(gen.returncode)
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
        serving = self._serving()
        self._event(
            logging.ERROR,
            "restart.failed",
            f"epoch {gen.epoch} failed to start: {gen.last_error_line() or cause}"
            + (f"; epoch {serving.epoch} keeps serving" if serving else ""),
            detail="\n".join(gen.stderr_tail) or None,
            epoch=gen.epoch,
            pid=gen.pid,
            cause=cause,
        )
        if serving is not None:
            self._restore_hot_restart_flag(serving, gen.epoch)
        self._after_failed_start(gen.epoch, cause)

    def _after_failed_start(self, epoch: int, cause: str = "") -> None:
        if cause == PARENT_DIED:
            return  # the recovery for its parent's death is already under way
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
            self._retry_wanted = False
            return
        delay = exponential_delay(self._hot_failures, HOT_RETRY_FIRST_S, COLD_BACKOFF_CAP_S)
        self._retry_wanted = True
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
        if self._settings.exit_on_child_failure and not planned:
            self._begin_stop(
                "the serving child died and --exit-on-child-failure is set", ExitCode.CHILD_KILLED
            )
            return
        starting = self._starting()
        if starting is not None:
            # Its parent is gone: it would hang or abort (§5, measured), never serve.
            starting.killed_by_us = PARENT_DIED
            starting.process.kill()
        parents = self._in_state(GenerationState.DRAINING)
        if parents and not gen.doomed and parents[-1].epoch == gen.epoch - 1:
            self._respawn_epoch = gen.epoch
        if planned:
            self._need_cold_start = self._respawn_epoch is None
            self._cold_reason = "full restart"
            return
        self._on_outage_failure(f"serving epoch {gen.epoch} died", immediate=True)

    def _on_drained(self, gen: Generation, status: str) -> None:
        successor = self._serving()
        if (
            successor is not None
            and gen.draining_since is not None
            and self._is_early(gen, successor)
        ):
            # Measured: the successor aborts at LIVE + parent-shutdown + 10 s (sooner when
            # parent-shutdown >= 5 s), and a hot restart from it hangs forever with the
            # flag stuck. So no hot restart: epoch 0 at the next request or at its death.
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
            "drain cut short by a newer epoch" if gen.drain_cut_by_restart else "drain finished",
            epoch=gen.epoch,
            pid=gen.pid,
            status=status,
        )

    def _is_early(self, gen: Generation, successor: Generation) -> bool:
        assert gen.draining_since is not None
        if gen.drain_cut_by_restart:
            return False
        shutdown_s = ENVOY_DEFAULT_PARENT_SHUTDOWN_S
        if successor.envoy is not None and successor.envoy.command_line.parent_shutdown_time_s:
            shutdown_s = successor.envoy.command_line.parent_shutdown_time_s
        return time.monotonic() < gen.draining_since + shutdown_s - 0.5

    def _on_outage_failure(self, what: str, *, immediate: bool = False) -> None:
        """Nothing serves: count it against the crash budget and schedule epoch 0.

        `immediate` for the first attempt after a death (the outage is already on);
        consecutive failed cold starts back off 1 s doubling to 30 s.
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
        self._need_cold_start = self._respawn_epoch is None
        self._cold_reason = "recovery"
        if immediate:
            epoch = self._respawn_epoch if self._respawn_epoch is not None else 0
            self._event(logging.INFO, "restart.recovery_scheduled", what, epoch=epoch, in_s=0)
            return
        self._cold_failures += 1
        delay = exponential_delay(self._cold_failures, COLD_BACKOFF_FIRST_S, COLD_BACKOFF_CAP_S)
        self._reactor.set_timeout(Timer.RETRY, delay)
        self._event(logging.INFO, "restart.recovery_scheduled", what, epoch=0, in_s=delay)

    # -- hot-restart shared memory ----------------------------------------------
    def _restore_hot_restart_flag(self, serving: Generation, failed_epoch: int) -> None:
        """Clear the flag a dead child left set, so the same epoch can be tried again (§3)."""
        assert self._starting() is None, "a starting child owns the flag"
        path = shm_path(self._base_id(serving))
        try:
            cleared = clear_initializing(path, layout_for(self._hot_restart_version(serving)))
        except ShmUnsupported as err:
            self._event(
                logging.WARNING,
                "hot_restart.flag_untouched",
                f"cannot restore the hot-restart flag ({err}); if the failed child left it "
                "set, every hot restart fails until a full restart (stop, then start)",
                epoch=failed_epoch,
            )
            return
        if cleared:
            self._event(
                logging.INFO,
                "hot_restart.flag_cleared",
                "cleared the INITIALIZING flag the failed child left (upstream #726, #33446)",
                epoch=failed_epoch,
                path=str(path),
            )

    def _hot_restart_version(self, gen: Generation) -> str | None:
        """The running binary's --hot-restart-version: admin told us, or ask the binary once."""
        exe = gen.envoy.exe if gen.envoy is not None else None
        if exe is None:
            return None
        known = self._hot_restart_versions.get(exe)
        if known is not None:
            return known
        try:
            result = subprocess.run(
                [exe, "--hot-restart-version"],
                capture_output=True,
                timeout=HOT_RESTART_VERSION_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        # Envoy prints it to stderr with no newline (ENVOY_FACTS §14).
        text = (result.stderr or result.stdout).decode(errors="replace").strip()
        if result.returncode != 0 or not text:
            return None
        self._hot_restart_versions[exe] = text
        return text

    def _base_id(self, gen: Generation) -> int:
        if self._settings.base_id is not None:
            return self._settings.base_id
        envoy = gen.envoy
        if envoy is None:
            return 0
        if envoy.command_line.base_id is not None:
            return envoy.command_line.base_id
        if envoy.command_line.use_dynamic_base_id and envoy.command_line.base_id_path:
            try:
                return int(envoy.resolve(envoy.command_line.base_id_path).read_text().strip())
            except (OSError, ValueError):
                return 0
        return 0

    def _admin_address(self, gen: Generation) -> AdminAddress | None:
        if self._settings.admin_address is not None:
            return self._settings.admin_address
        key = id(gen)
        if key in self._admin_addresses:
            return self._admin_addresses[key]
        envoy = gen.envoy
        if envoy is not None and envoy.command_line.admin_address_path:
            try:
                text = envoy.resolve(envoy.command_line.admin_address_path).read_text()
                return parse_admin_address(text)
            except (OSError, AutoreloadError):
                return None  # Envoy writes it once admin listens; ask again next probe
        config = self._settings.config
        if config is None and envoy is not None and envoy.command_line.config_path:
            config = envoy.resolve(envoy.command_line.config_path)
        address: AdminAddress | None = None
        if config is not None:
            try:
                address = admin_address_from_config(config)
            except AutoreloadError as err:
                self._warn_once("admin.unknown", f"{err}; judging LIVE by shared memory instead")
        if address is None:
            self._warn_once(
                "admin.none",
                "no admin address (--admin-address, or admin.address in the config): "
                "judging LIVE by Envoy's hot-restart shared memory instead",
            )
        self._admin_addresses[key] = address
        return address

    # -- stopping -------------------------------------------------------------
    def _begin_stop(self, reason: str, floor: ExitCode) -> None:
        if self._stopping:
            self._event(logging.DEBUG, "shutdown.already_stopping", reason=reason)
            return
        self._stopping = True
        self._exit_floor = max(self._exit_floor, floor)
        for timer in Timer:
            self._reactor.cancel(timer)
        alive = self._alive()
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
            gen.process.kill()
        if alive:
            self._exit_floor = ExitCode.CHILD_KILLED
            self._reactor.set_timeout(Timer.KILL_WAIT, KILL_REAP_WAIT_S)

    def _finish_stop_if_done(self) -> None:
        if self._stopping and not self._alive():
            self._reactor.cancel(Timer.TERM_WAIT)
            self._reactor.cancel(Timer.KILL_WAIT)
            self._exit_code = self._exit_floor
            self._remove_shared_memory()
            self._event(logging.INFO, "shutdown.finished", exit_code=int(self._exit_code))

    def _remove_shared_memory(self) -> None:
        """Envoy leaves its segment behind after every exit (ENVOY_FACTS §0); with the
        whole family gone nobody uses it, and the next epoch 0 would recreate it."""
        if self._family_base_id is None:
            return
        path = shm_path(self._family_base_id)
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            self._event(logging.DEBUG, "hot_restart.shm_kept", str(err), path=str(path))

    def _kill_leftovers(self) -> None:
        """Last resort on the way out (a bug raised): no child outlives the daemon."""
        for gen in self._alive():
            if gen.poll() is None:
                gen.process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    gen.process.wait(timeout=KILL_REAP_WAIT_S)
            gen.close_stderr()

    # -- helpers --------------------------------------------------------------
    def _forward(self, signum: signal.Signals) -> None:
        alive = self._alive()
        for gen in alive:
            gen.send_signal(signum)
        self._event(
            logging.INFO,
            "signal.forwarded",
            signal=signum.name,
            epochs=[g.epoch for g in alive],
            pids=[g.pid for g in alive],
        )

    def _check_start_script_execs(self, gen: Generation) -> None:
        exe = executable_of(gen.pid)
        if exe is not None and is_shell(exe):
            self._warn_once(
                "start_script.no_exec",
                f"the start script runs Envoy as a child of {Path(exe).name} instead of "
                "exec'ing it: signals reach the shell, not Envoy; end the script with "
                '`exec envoy ... --restart-epoch "$RESTART_EPOCH"`',
                epoch=gen.epoch,
                pid=gen.pid,
            )

    def _warn_once(
        self, event: str, message: str, epoch: int | None = None, pid: int | None = None
    ) -> None:
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


def run(settings: Settings, changes: ChangeDetector | None = None) -> ExitCode:
    """Supervise until stopped; the reactor's signal handlers live exactly this long."""
    with Reactor() as reactor:
        try:
            return Supervisor(settings, reactor, changes).run()
        finally:
            if changes is not None:
                changes.close()
