"""Every state of the restarter core, and every move it may make: read this file first.

Two machines, each with one table and one writer:
- a **generation** (one run of the start script at one restart epoch) moves through
  `GenerationState`; `roster.py` is the only module that moves it or writes its marks;
- the supervisor's **plan** (what to start next, if anything) is one value of `Plan`;
  `Supervisor._replan` is the only writer and checks each move against `PLAN_EDGES`.

Everything else the core remembers is either a queue (`batches.py`: restart requests),
a deadline (`Timer`, armed in the reactor), or derived from these two for display
(`SupervisorState`). Modelled on supervisor's `states.py`: named states, named groups,
and a comment on every edge.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from envoy_autoreload.digest import Snapshot

if TYPE_CHECKING:
    from envoy_autoreload.generations import ConfigGeneration


class IllegalMove(AssertionError):
    """A move no table allows: a bug in the core. Raised, contained by the loop, logged
    as `daemon.internal_error`; the simulation treats it as a failed invariant."""


# -- generations ------------------------------------------------------------------
class GenerationState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    EXITED = "exited"


ALLOWED_TRANSITIONS: Final[dict[GenerationState, frozenset[GenerationState]]] = {
    GenerationState.STARTING: frozenset(
        {
            # STARTING -> SERVING: Envoy reported LIVE at this epoch (ENVOY_FACTS §15).
            GenerationState.SERVING,
            # STARTING -> EXITED: it failed before LIVE (exit, signal, or killed at its
            # start deadline, §7).
            GenerationState.EXITED,
        }
    ),
    GenerationState.SERVING: frozenset(
        {
            # SERVING -> DRAINING: a newer generation went LIVE; Envoy drains this one by
            # itself and ends it at parent-shutdown time (§2). We never signal it (§6).
            GenerationState.DRAINING,
            # SERVING -> EXITED: the serving proxy died, or we stopped it (shutdown, a
            # full restart).
            GenerationState.EXITED,
        }
    ),
    # DRAINING -> EXITED: the normal end of a drain, or an early death (§6).
    GenerationState.DRAINING: frozenset({GenerationState.EXITED}),
    GenerationState.EXITED: frozenset(),
}

# Groups, as supervisor names them.
ALIVE: Final = frozenset(
    {GenerationState.STARTING, GenerationState.SERVING, GenerationState.DRAINING}
)
# SIGUSR1 (reopen access logs) goes to these; never to a STARTING one: before Envoy
# installs its handlers the default action kills it (§11). It is replayed to a starting
# generation once it serves (REVIEW-core finding 14).
FORWARDS_SIGNALS: Final = frozenset({GenerationState.SERVING, GenerationState.DRAINING})


@dataclass(slots=True)
class Marks:
    """What the core knows about a generation beside its state; written by `roster.py`.

    - `stop_reason`: we decided to stop it (a full restart, an orphan, a start deadline);
      its exit is then expected, not a failure of Envoy's.
    - `doomed`: its parent died before Envoy ended the drain, so Envoy will abort it
      about 10 s after its parent-shutdown time and a hot restart from it hangs (§6).
    - `drain_cut_by_restart`: a third process made Envoy end its drain early (§8), so an
      early exit is expected.
    - `owes_sigusr1`: a SIGUSR1 arrived while it was starting; forwarded once it serves.
    - `terminated`: SIGTERM was sent (after `stop_reason`), so it is not sent twice.
    """

    stop_reason: str | None = None
    terminated: bool = False
    doomed: bool = False
    drain_cut_by_restart: bool = False
    owes_sigusr1: bool = False


# -- the plan ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StartNext:
    """Start the next epoch once pacing allows: the request passed the gate (or there is
    no gate), or it is a retry of one that did (after the RETRY backoff)."""

    reason: str
    seq: int  # the newest request it answers
    content: Snapshot | None = None  # what the gate validated, when watching
    config: ConfigGeneration | None = None  # the snapshot that passed (generations on)
    # A rollback starts a stored generation, not the files: no later verdict about the
    # files makes it stale, and it is not requeued as a request if the serving one dies.
    rollback: bool = False


@dataclass(frozen=True, slots=True)
class Respawn:
    """Start the dead serving epoch again from its still-draining parent (measured: the
    parent refuses new connections and nobody tells it to exit; the same epoch started
    again from it goes LIVE in ~0.1 s)."""

    epoch: int


@dataclass(frozen=True, slots=True)
class ColdStart:
    """Nothing serves: start epoch 0 once the whole family is gone (§5, #10902)."""

    reason: str
    covers_seq: int = 0  # a validated batch this start carries (a full restart)
    content: Snapshot | None = None  # what that batch validated, when watching
    config: ConfigGeneration | None = None  # its snapshot; None: the recovery target


Plan = StartNext | Respawn | ColdStart


class PlanKind(enum.Enum):
    NONE = "none"
    START_NEXT = "start_next"
    RESPAWN = "respawn"
    COLD_START = "cold_start"


def kind_of(plan: Plan | None) -> PlanKind:
    match plan:
        case None:
            return PlanKind.NONE
        case StartNext():
            return PlanKind.START_NEXT
        case Respawn():
            return PlanKind.RESPAWN
        case ColdStart():
            return PlanKind.COLD_START


_N, _S, _R, _C = PlanKind.NONE, PlanKind.START_NEXT, PlanKind.RESPAWN, PlanKind.COLD_START

# (from, to) -> the reasons (`why` of `_replan`) that may make that move.
PLAN_EDGES: Final[dict[tuple[PlanKind, PlanKind], frozenset[str]]] = {
    # A batch passed the gate (or there is no gate), or a failed start is retried after
    # its backoff with the same epoch (§4).
    # Or the serving generation failed probation: back to the last good one.
    (_N, _S): frozenset({"gate_passed", "no_gate", "retry", "rollback"}),
    # A newer batch passed the gate, or a newer failure re-plans its retry: the newest
    # validated content wins; its seq covers the older one's requests.
    # Requests that ask for the very content a plan carries join it (finding 15).
    (_S, _S): frozenset({"gate_passed", "no_gate", "retry", "absorbed"}),
    # Carried out; the content changed since it was validated (never start unvalidated
    # content); a newer check of it failed; retries were used up; the serving epoch died
    # (the batch is requeued); the queued requests turned out to change nothing
    # (REVIEW-core finding 9); its files went missing; a rollback whose bad config no
    # longer serves (a newer push went LIVE before it started).
    (_S, _N): frozenset(
        {
            "started",
            "changed_since_validated",
            "gate_failed",
            "abandoned",
            "serving_died",
            "reverted",
            "went_missing",
            "rollback_moot",
        }
    ),
    # The serving epoch died while its parent still drains: respawn from the parent.
    (_N, _R): frozenset({"serving_died"}),
    # Nothing serves, or we stop the serving epoch on purpose (a doomed epoch cannot hot
    # restart; an incompatible binary needs epoch 0; a planned stop of the serving one).
    (_N, _C): frozenset({"recovery", "full_restart", "incompatible_binary", "serving_stopped"}),
    (_S, _C): frozenset({"recovery", "full_restart", "incompatible_binary", "serving_stopped"}),
    # The respawn started; its parent is gone too, so only epoch 0 is left.
    (_R, _N): frozenset({"started"}),
    (_R, _C): frozenset({"recovery", "incompatible_binary", "serving_stopped"}),
    # Epoch 0 started.
    (_C, _N): frozenset({"started"}),
}


# -- deadlines --------------------------------------------------------------------
class Timer(enum.Enum):
    """The supervisor's deadlines; at most one of each is armed."""

    PROBE = "probe"  # ask the starting generation whether it is LIVE yet
    START_DEADLINE = "start_deadline"  # --start-timeout for the starting generation
    RETRY = "retry"  # backoff before the next attempt (hot retry or cold start)
    DRAIN_WAIT = "drain_wait"  # --max-drain-wait for the previous parent to exit
    ORPHAN_KILL = "orphan_kill"  # orphans TERMed so epoch 0 can start get KILLed after it
    HUNG_DRAIN = "hung_drain"  # a draining epoch past its parent-shutdown time (§7)
    HEALTH_ROUND = "health_round"  # the next round of probation's checks
    PROBATION_END = "probation_end"  # --health-window after LIVE: the generation is good
    TERM_WAIT = "term_wait"  # --term-wait after SIGTERM to every child
    PARENT_LEAVING = "parent_leaving"  # a stopping parent its TERMed child asked to exit
    KILL_WAIT = "kill_wait"  # how long SIGKILLed children get to be reaped
    DEBOUNCE = "debounce"  # a burst of file events is due (quiet window or max wait)
    COMMAND_DEADLINE = "command_deadline"  # --validate-timeout for a validation step
    SELF_TEST_DEADLINE = "self_test_deadline"  # the new image's self-test before a re-exec
    CONTROL_IDLE = "control_idle"  # control clients that never sent a request are dropped
    ADVANCE = "advance"  # a decision made without an event: carried out from the loop
    STANDBY = "standby"  # the next spawn made ahead, in the turn after a LIVE (standby.py)
    CHECK_AHEAD = "check_ahead"  # the files rested: a run ahead may start (check_ahead.py)


class SupervisorState(enum.Enum):
    """Derived from the generations and the plan, for status lines; never stored."""

    STARTING = "starting"
    SERVING = "serving"
    VALIDATING = "validating"
    RESTARTING = "restarting"
    RECOVERING = "recovering"
    STOPPING = "stopping"
