"""What an exit means: a generation was reaped, and this decides what follows.

A starting epoch that failed is retried at the same epoch (ENVOY_FACTS §4) a few times,
then given up until the next change; the serving Envoy's death plans a respawn from its
still-draining parent or a cold start of epoch 0, paced by `recovery.py`; a draining
epoch that died before Envoy ended it dooms its successor (§6). Decisions that move the
plan go through the shared `Planner`; the rest of the supervisor is reached through the
few `Hooks` it lends.
"""

from __future__ import annotations

import logging
from typing import Final, Protocol, assert_never

from envoy_autoreload.backoff import (
    COLD_BACKOFF_CAP_S,
    HOT_RESTART_RETRIES,
    HOT_RETRY_FIRST_S,
    exponential_delay,
)
from envoy_autoreload.batches import Batches
from envoy_autoreload.command import describe_exit
from envoy_autoreload.digest import Snapshot
from envoy_autoreload.errors import ExitCode, SpawnError
from envoy_autoreload.gatekeeper import Gatekeeper
from envoy_autoreload.generations import ConfigGeneration
from envoy_autoreload.launcher import Launcher
from envoy_autoreload.logs import log_event
from envoy_autoreload.planner import Planner
from envoy_autoreload.ports import EnvoyFacts, Reactor
from envoy_autoreload.recovery import Recovery
from envoy_autoreload.rollbacks import MANUAL_REASON, ROLLBACK_REASON
from envoy_autoreload.roster import Generation, Roster
from envoy_autoreload.settings import Settings
from envoy_autoreload.states import (
    ColdStart,
    GenerationState,
    IllegalMove,
    Respawn,
    StartNext,
    Timer,
)
from envoy_autoreload.telemetry import ExitCause, Telemetry
from envoy_autoreload.triggers import Triggers

logger = logging.getLogger(__name__)

PARENT_DIED: Final = "its parent, the serving epoch, died"
# Exit codes by which a POSIX shell says it could not run a command (the script's own
# mistake, not Envoy's).
SHELL_CANNOT_RUN: Final = {126: "a command in it is not executable", 127: "command not found"}


class Hooks(Protocol):
    """What the exit policy needs of the supervisor."""

    @property
    def ever_served(self) -> bool: ...
    @property
    def stopping(self) -> bool: ...
    def begin_stop(self, reason: str, floor: ExitCode) -> None: ...
    def on_live(self, gen: Generation) -> None: ...
    def status_text(self) -> str: ...


class ExitPolicy:
    def __init__(
        self,
        settings: Settings,
        reactor: Reactor,
        roster: Roster,
        family: EnvoyFacts,
        telemetry: Telemetry,
        planner: Planner,
        batches: Batches,
        recovery: Recovery,
        launcher: Launcher,
        gatekeeper: Gatekeeper,
        triggers: Triggers,
        hooks: Hooks,
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self._roster = roster
        self._family = family
        self._telemetry = telemetry
        self._planner = planner
        self._batches = batches
        self._recovery = recovery
        self._launcher = launcher
        self._gatekeeper = gatekeeper
        self._triggers = triggers
        self._hooks = hooks

    def _last_words(self, gen: Generation) -> str | None:
        """Envoy's last lines, for a failure's detail: in the JSON log only, where they
        are not already (in human format its stderr was just passed through)."""
        return _last_words_of(gen) if self._settings.log_format == "json" else None

    def on_exited(self, gen: Generation) -> bool:
        """It was reaped; True when the daemon is stopping (the caller finishes it)."""
        previous = self._roster.exited(gen)
        self._family.forget(gen)
        assert gen.returncode is not None
        status = describe_exit(gen.returncode)
        stopping = self._hooks.stopping
        self._telemetry.child_exited(_exit_cause(previous, gen, stopping))
        if stopping:
            log_event(
                logger,
                logging.INFO,
                "child.exited",
                epoch=gen.epoch,
                pid=gen.pid,
                config=gen.config_short,
                status=status,
            )
            return True
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
        return False

    # -- a start that failed -----------------------------------------------------------
    def _on_start_failed(self, gen: Generation, cause: str) -> None:
        self._launcher.ended()
        shell_says = SHELL_CANNOT_RUN.get(gen.returncode or 0)
        if shell_says is not None and not self._hooks.ever_served:
            # The script's own mistake (a wrong Envoy path), not Envoy's: no retry will
            # fix it, so start-up fails at once. Once something served, it is a failed
            # start like any other and the serving epoch keeps serving.
            raise SpawnError(
                f"the start script {self._settings.start_script} exited {gen.returncode} "
                f"({shell_says}) before Envoy ran: {gen.last_error_line() or 'no output'}"
            )
        serving = self._roster.serving()
        if serving is not None and cause != PARENT_DIED and self._family.took_over(gen):
            self._stranded(serving, gen)
            return
        planner = self._planner
        # Our own reason first when we stopped it (its deadline): Envoy's last line is
        # then whatever it was logging, not why it failed.
        why = gen.marks.stop_reason or gen.last_error_line() or cause
        planner.last_start_error = f"epoch {gen.epoch} failed to start: {why}"
        log_event(
            logger,
            logging.INFO if cause == PARENT_DIED else logging.ERROR,
            "restart.failed",
            planner.last_start_error
            + (f"; epoch {serving.epoch} keeps serving" if serving else ""),
            detail=self._last_words(gen),
            epoch=gen.epoch,
            pid=gen.pid,
            config=gen.config_short,
            cause=cause,
        )
        planner.last_failed_seq = gen.covers_seq
        if cause != PARENT_DIED:
            self._batches.retry_pending(
                gen.reason, error=planner.last_start_error, status=self._hooks.status_text()
            )
            self.after_failed_start(gen.epoch, gen.snapshot, gen.config)

    def exec_failed(
        self,
        epoch: int,
        reason: str,
        message: str,
        covers_seq: int,
        content: Snapshot | None,
        config: ConfigGeneration | None = None,
    ) -> None:
        serving = self._roster.serving()
        log_event(
            logger,
            logging.ERROR,
            "restart.failed",
            message + (f"; epoch {serving.epoch} keeps serving" if serving else ""),
            epoch=epoch,
            cause="exec failed",
        )
        self._planner.last_failed_seq = covers_seq
        self._planner.last_start_error = message
        self._batches.retry_pending(reason, error=message, status=self._hooks.status_text())
        self.after_failed_start(epoch, content, config)

    def _stranded(self, parent: Generation, gen: Generation) -> None:
        """The new epoch went LIVE in Envoy's eyes and died before a probe saw it: its
        parent drains now, refuses new connections and never exits by itself
        (measured). Nothing serves: respawn the epoch from that parent, as after the
        serving Envoy's death (found by the long simulation run)."""
        log_event(
            logger,
            logging.ERROR,
            "child.died",
            f"epoch {gen.epoch} took over from epoch {parent.epoch} and died before it was "
            f"seen LIVE; epoch {parent.epoch} refuses new connections now: respawning "
            f"epoch {gen.epoch} from it",
            detail=self._last_words(gen),
            epoch=gen.epoch,
            pid=gen.pid,
            config=gen.config_short,
            status=describe_exit(gen.returncode or 0),
        )
        self._roster.stranded(parent, gen)
        self._requeue_pending()
        self._batches.requeue(gen.reason)
        self._planner.replan(Respawn(gen.epoch), "serving_died")
        self.outage(f"epoch {gen.epoch} died after it took over", immediate=True)

    def after_failed_start(
        self, epoch: int, content: Snapshot | None, config: ConfigGeneration | None = None
    ) -> None:
        if self._settings.exit_on_child_failure:
            self._hooks.begin_stop(
                "a child failed and --exit-on-child-failure is set", ExitCode.CHILD_KILLED
            )
            return
        if self._roster.serving() is None:
            respawn_failed = bool(self._roster.draining())
            # The failed start's request stays with the recovery: the epoch 0 that
            # serves next answers it (a reload behind a full restart is not dropped).
            self.outage(
                f"epoch {epoch} failed to start",
                immediate=respawn_failed,
                covers_seq=self._planner.last_failed_seq,
                content=content,
                config=config,
            )
            return
        planner = self._planner
        planner.hot_failures += 1
        if planner.hot_failures > HOT_RESTART_RETRIES:
            self._abandon(epoch, content)
            return
        delay = exponential_delay(planner.hot_failures, HOT_RETRY_FIRST_S, COLD_BACKOFF_CAP_S)
        planner.replan(StartNext("retry", planner.last_failed_seq, content, config), "retry")
        self._reactor.set_timeout(Timer.RETRY, delay)
        log_event(
            logger,
            logging.INFO,
            "restart.retry_scheduled",
            epoch=epoch,
            attempt=planner.hot_failures + 1,
            in_s=delay,
        )

    def _abandon(self, epoch: int, content: Snapshot | None) -> None:
        planner = self._planner
        log_event(
            logger,
            logging.WARNING,
            "restart.abandoned",
            f"epoch {epoch} failed {planner.hot_failures} times; keeping the serving epoch "
            "until the next change or SIGHUP",
            epoch=epoch,
        )
        planner.hot_failures = 0
        if planner.plan is not None:
            planner.replan(None, "abandoned")
        # The same content again (a push re-run) is not a new chance; a change is.
        self._triggers.abandoned_digest = content.digest if content is not None else None
        self._batches.finish(
            "abandoned",
            "retry",
            seq=planner.last_failed_seq,
            error=planner.last_start_error,
            status=self._hooks.status_text(),
        )

    # -- the serving Envoy's death ----------------------------------------------------------
    def _on_serving_died(self, gen: Generation, status: str) -> None:
        planned = gen.marks.stop_reason is not None
        successor = self._roster.starting()
        if not planned and successor is not None and self._launcher.took_over(successor):
            # The successor had taken over unseen (finding 3): this was its drain's end,
            # or, if it did not exit cleanly, a parent that died early (§6).
            self._hooks.on_live(successor)
            if gen.returncode == 0:
                log_event(
                    logger,
                    logging.INFO,
                    "child.exited",
                    "drain finished",
                    epoch=gen.epoch,
                    pid=gen.pid,
                    config=gen.config_short,
                    status=status,
                )
            else:
                self._doom(gen, successor, status)
            return
        log_event(
            logger,
            logging.INFO if planned else logging.ERROR,
            "child.died",
            f"the serving Envoy exited ({status}): {gen.marks.stop_reason}"
            if planned
            else f"the serving Envoy died ({status}); nothing serves until a new epoch is LIVE",
            detail=None if planned else self._last_words(gen),
            epoch=gen.epoch,
            pid=gen.pid,
            config=gen.config_short,
            status=status,
        )
        self._reactor.cancel(Timer.RETRY)
        self._planner.hot_failures = 0
        if planned:
            if not isinstance(self._planner.plan, ColdStart):
                cold = ColdStart(f"full restart ({gen.marks.stop_reason})")
                self._planner.replan(cold, "serving_stopped")
            return
        self._unplanned_death(gen)

    def _unplanned_death(self, gen: Generation) -> None:
        self._requeue_pending()
        if self._settings.exit_on_child_failure:
            self._hooks.begin_stop(
                "the serving child died and --exit-on-child-failure is set", ExitCode.CHILD_KILLED
            )
            return
        starting = self._roster.starting()
        if starting is not None:
            # Its parent is gone: it would hang or abort (§5, measured), never serve.
            self._roster.mark_stopping(starting, PARENT_DIED)
            self._launcher.ended()  # its deadline must not rename why it is gone
            starting.process.kill()
            self._requeue_start(starting)
        parents = self._roster.draining()
        if parents and not gen.marks.doomed and parents[-1].epoch == gen.epoch - 1:
            # Measured: the dead epoch's parent refuses new connections and nobody tells
            # it to exit; the same epoch started again from it goes LIVE in ~0.1 s.
            self._planner.replan(Respawn(gen.epoch), "serving_died")
        served_s = self._reactor.now() - (gen.serving_at or gen.started_at)
        self.outage(f"serving epoch {gen.epoch} died", served_s=served_s)

    def _requeue_pending(self) -> None:
        """A batch the dead epoch was about to take (being validated, or validated and
        waiting, or starting) goes back in the queue: it passes the gate and is answered
        once something serves again. Nothing is dropped silently."""
        gate = self._gatekeeper.gate
        if gate.busy:
            gate.abandon()
            self._batches.requeue(self._gatekeeper.reason)
        plan = self._planner.plan
        if isinstance(plan, StartNext) and plan.rollback:
            self._drop_rollback(plan)
        elif isinstance(plan, StartNext):
            self._batches.requeue(plan.reason)
            self._planner.replan(None, "serving_died")
        elif plan is not None:
            raise IllegalMove(f"a recovery plan while an epoch served: {plan}")

    def _requeue_start(self, gen: Generation) -> None:
        """The requests a start killed with its parent covered go back in the queue,
        but a rollback is no request for the files: an operator's is answered as
        failed, as when it had not started yet (`_drop_rollback`)."""
        if gen.reason not in (ROLLBACK_REASON, MANUAL_REASON):
            self._batches.requeue(gen.reason)
            return
        if gen.covers_seq:
            self._batches.finish(
                "start_failed",
                gen.reason,
                seq=gen.covers_seq,
                error=f"the serving Envoy died while the rollback's epoch {gen.epoch} "
                "started from it; recovery starts the last good config",
                status=self._hooks.status_text(),
            )

    def _drop_rollback(self, plan: StartNext) -> None:
        """Recovery starts the last good generation anyway; an operator's rollback to
        another one is answered as failed rather than sent through the gate as a
        request for the files."""
        self._planner.replan(None, "serving_died")
        if plan.seq:
            self._batches.finish(
                "start_failed",
                plan.reason,
                seq=plan.seq,
                error="the serving Envoy died before the rollback started; recovery "
                "starts the last good config",
                status=self._hooks.status_text(),
            )

    def outage(
        self,
        what: str,
        *,
        immediate: bool = False,
        served_s: float | None = None,
        covers_seq: int = 0,
        content: Snapshot | None = None,
        config: ConfigGeneration | None = None,
    ) -> None:
        """Nothing serves: count it against the crash budget and plan the recovery;
        `covers_seq` (and its validated `content`) is a request it still owes."""
        if self._recovery.budget_spent(what):
            self._hooks.begin_stop("crash budget exhausted", ExitCode.CHILD_KILLED)
            return
        planner = self._planner
        if not isinstance(planner.plan, Respawn | ColdStart):
            planner.replan(ColdStart("recovery", covers_seq, content, config), "recovery")
        respawn = isinstance(planner.plan, Respawn)
        epoch = planner.plan.epoch if isinstance(planner.plan, Respawn) else 0
        delay = self._recovery.delay(respawn=respawn, immediate=immediate, served_s=served_s)
        if delay:
            self._reactor.set_timeout(Timer.RETRY, delay)
        log_event(logger, logging.INFO, "restart.recovery_scheduled", what, epoch=epoch, in_s=delay)

    # -- a drain that ended ------------------------------------------------------------------
    def _on_drained(self, gen: Generation, status: str) -> None:
        successor = self._roster.serving()
        planned = gen.marks.stop_reason is not None  # we stopped it: not Envoy's doing
        if successor is not None and not planned and self._recovery.died_early(gen, successor):
            self._doom(gen, successor, status)
            return
        ended = "drain cut short by a newer epoch" if gen.marks.drain_cut_by_restart else None
        log_event(
            logger,
            logging.INFO,
            "child.exited",
            gen.marks.stop_reason or ended or "drain finished",
            epoch=gen.epoch,
            pid=gen.pid,
            config=gen.config_short,
            status=status,
        )

    def _doom(self, gen: Generation, successor: Generation, status: str) -> None:
        """Measured: the successor aborts ~10 s after its parent-shutdown time (sooner
        when that is >= 5 s), and a hot restart from it hangs for ever with the flag
        stuck. So no hot restart: epoch 0 at the next request, or the moment it dies."""
        self._roster.mark_doomed(successor)
        log_event(
            logger,
            logging.ERROR,
            "child.drain_cut",
            f"draining epoch {gen.epoch} died ({status}) before Envoy ended it; serving "
            f"epoch {successor.epoch} will abort about 10 s after its parent-shutdown "
            "time (ENVOY_FACTS §6) and cannot hot restart; epoch 0 is cold-started at "
            "the next restart request or the moment it dies",
            epoch=gen.epoch,
            pid=gen.pid,
            config=gen.config_short,
            status=status,
            serving_epoch=successor.epoch,
            serving_pid=successor.pid,
        )


def _last_words_of(gen: Generation) -> str | None:
    return "\n".join(gen.stderr_tail) or None


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
