"""Model conformance: scenarios that run on both the modelled Envoy and the real one.

DESIGN-core §3: the simulation is only as good as its model of Envoy. Each scenario here
is data: the steps that act on the daemon and its world, and the outcome both sides must
show. Two small interpreters carry them out:
- `tests/simulation/test_conformance.py`: the real core against `tests/simulation/model.py`
  on a virtual clock (milliseconds of wall time);
- `tests/envoy/test_conformance.py`: the real daemon (`python -m envoy_autoreload`) and
  the real Envoy 1.40, with real files, signals and ports.
Both assert the same `Outcome`, from the daemon's own events where the daemon is what is
observed, and from outside it (the model's processes; /proc and a fresh HTTP connection)
where Envoy is. When the real Envoy passes and the model does not, the model is wrong
(or the harness): measure the real binary and fix `model.py`, never the expectation alone.

Waiting is by event, never by time: `Await` names a daemon event (the JSON log's `event`
and its fields), so a step happens at the same point of the story on both sides, only
the clock differs. Durations appear only where the model claims one (`within_s`).
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

MAX_FAMILY_PROCESSES: Final = 3  # ENVOY_FACTS §0: epochs share domain sockets modulo 3
SLOW_INIT_S: Final = 30.0  # `initial_fetch_timeout` of a config waiting for an absent xDS


def body(version: int) -> str:
    """What the listener of config `version` answers."""
    return f"v{version}"


# -- steps ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Write:
    """Write the config whose listener answers `v<version>`, atomically (a rename): the
    daemon watches its directory, so this is a restart request once the debounce settles."""

    version: int
    # Also a listener on the port `HoldPort` holds: `envoy --mode validate` passes, the
    # child fails with "Address already in use" (ENVOY_FACTS §1, §3).
    binds_held_port: bool = False
    # Stays PRE_INITIALIZING for SLOW_INIT_S, waiting for CDS from an xDS server that does
    # not answer (§8, §15): a start that is still under way when the next step comes.
    slow: bool = False


@dataclass(frozen=True, slots=True)
class Sighup:
    """SIGHUP to the daemon, `count` times in a row (a flood is coalesced)."""

    count: int = 1


@dataclass(frozen=True, slots=True)
class HoldPort:
    """Another process listens on a port (`tests/helpers.port_held`)."""


@dataclass(frozen=True, slots=True)
class ReleasePort:
    """That process lets the port go."""


Role = Literal["serving", "draining"]


@dataclass(frozen=True, slots=True)
class Freeze:
    """SIGSTOP the serving Envoy: it answers none of its children (§7); in the model,
    `EnvoyModel.unresponsive(True)`."""


@dataclass(frozen=True, slots=True)
class Thaw:
    """SIGCONT: it runs again and handles what its children sent meanwhile."""


@dataclass(frozen=True, slots=True)
class Kill:
    """A signal from outside the daemon (SIGKILL: the OOM killer, an operator; SIGABRT: a
    crash) to the Envoy the daemon last reported in `role` (`child.serving` /
    `child.draining`)."""

    role: Role
    signum: signal.Signals = signal.SIGKILL


@dataclass(frozen=True, slots=True)
class Await:
    """Until the daemon has logged `event` `count` times with these `fields`. With
    `within_s`, the time from the previous step's end must fall in that range: for the
    few timings the model claims (e.g. §6's abort 10 s after the parent-shutdown time)."""

    event: str
    fields: Mapping[str, object] = field(default_factory=dict)
    count: int = 1
    within_s: tuple[float, float] | None = None
    timeout_s: float = 30.0


def wait(
    event: str,
    *,
    count: int = 1,
    within_s: tuple[float, float] | None = None,
    timeout_s: float = 30.0,
    **fields: object,
) -> Await:
    return Await(event, fields, count, within_s, timeout_s)


@dataclass(frozen=True, slots=True)
class AwaitInitializing:
    """Until Envoy at `epoch` runs and is not LIVE yet (admin: PRE_INITIALIZING, §15)."""

    epoch: int


@dataclass(frozen=True, slots=True)
class Quiet:
    """No child is started for `seconds`: nothing was left queued (the positive control
    is the scenario's own earlier restarts)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Stop:
    """SIGTERM to the daemon, then its exit, which must come `within_s` (§2: Envoy exits
    at once on SIGTERM, without draining). What serves is read just before; must be the
    last step."""

    within_s: tuple[float, float] = (0.0, 5.0)


Step = (
    Write
    | Sighup
    | HoldPort
    | ReleasePort
    | Freeze
    | Thaw
    | Kill
    | Await
    | AwaitInitializing
    | Quiet
    | Stop
)


# -- outcome ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Outcome:
    """What both sides must show. `started` and the event counts come from the daemon's
    events; `live` from Envoy's side (the model's processes; the daemon's `child.serving`,
    which it logs only once admin said LIVE at that epoch over a fresh connection);
    `serves` from a fresh connection (the model: the newest LIVE process's config)."""

    started: tuple[int, ...]  # the epoch of every child started, in order
    live: tuple[int, ...]  # the epoch of every child that went LIVE, in order
    serves: str | None  # the body answered just before SIGTERM; None: nothing answers
    exit_code: int
    failed_starts: int = 0  # restart.failed
    abandoned: int = 0  # restart.abandoned
    died: int = 0  # child.died (the serving Envoy exited, planned or not)
    drain_cuts: int = 0  # child.drain_cut
    full_restarts: int = 0  # restart.full
    left_alive: int = 0  # family processes alive after the daemon exited


COUNTED: Final = {
    "failed_starts": "restart.failed",
    "abandoned": "restart.abandoned",
    "died": "child.died",
    "drain_cuts": "child.drain_cut",
    "full_restarts": "restart.full",
}


@dataclass(frozen=True, slots=True)
class Observed:
    outcome: Outcome
    max_alive: int  # the most family processes seen alive at once


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    steps: tuple[Step, ...]
    expected: Outcome
    parent_shutdown_s: int = 2  # Envoy's --parent-shutdown-time-s and the model's
    start_timeout_s: float = 60.0  # the daemon's --start-timeout


def check(scenario: Scenario, observed: Observed, side: str) -> None:
    """The one assertion both sides make."""
    assert observed.outcome == scenario.expected, (
        f"{side} disagrees with scenario {scenario.name}:\n"
        f"  expected {scenario.expected}\n  observed {observed.outcome}"
    )
    assert observed.max_alive <= MAX_FAMILY_PROCESSES, (
        f"{side}: {observed.max_alive} processes of the family alive at once"
    )


def counts(events: list[str]) -> dict[str, int]:
    """Outcome's event-count fields from a list of event names."""
    return {name: events.count(event) for name, event in COUNTED.items()}


# -- the scenarios ----------------------------------------------------------------------
SERVING_0 = wait("child.serving", epoch=0)
SOON: Final = (0.0, 2.0)  # a debounce, a validation and a start, with room for a loaded box
STOP_RACE: Final = (0.0, 12.0)  # a stop with a parent and its child alive: see 5a

SCENARIOS: Final = (
    # 1. A config that validates but cannot start (its port is held elsewhere): the same
    # epoch is tried 1 + 3 times (retries after 1, 2, 4 s), each leaving the INITIALIZING
    # flag stuck (§3) for the daemon to clear, then abandoned; epoch 0 never stops. Once
    # the port is free, a good config serves at the reused epoch 1 (§4).
    Scenario(
        "failed_child_then_good_config",
        (
            SERVING_0,
            HoldPort(),
            Write(1, binds_held_port=True),
            wait("restart.abandoned", epoch=1, within_s=(7.0, 12.0)),
            ReleasePort(),
            Write(2),
            wait("child.serving", epoch=1, within_s=SOON),
            wait("child.exited", epoch=0),
            Stop(),
        ),
        Outcome(
            started=(0, 1, 1, 1, 1, 1),
            live=(0, 1),
            serves=body(2),
            exit_code=0,
            failed_starts=4,
            abandoned=1,
        ),
    ),
    # 2a. The serving Envoy SIGKILLed when no parent drains: epoch 0 is cold-started at
    # once with the files on disk. Then that one crashes (SIGABRT: Envoy prints a
    # backtrace and dies of it): a second quick death is paced by 1 s.
    Scenario(
        "serving_killed_alone",
        (
            SERVING_0,
            Write(1),
            wait("child.serving", epoch=1),
            wait("child.exited", epoch=0),
            Kill("serving"),
            wait("child.serving", epoch=0, count=2, within_s=SOON),
            Kill("serving", signal.SIGABRT),
            wait("child.serving", epoch=0, count=3, within_s=(0.9, 3.0)),
            Stop(),
        ),
        Outcome(started=(0, 1, 0, 0), live=(0, 1, 0, 0), serves=body(1), exit_code=0, died=2),
    ),
    # 2b. The serving Envoy SIGKILLed while its parent drains: the dead epoch is started
    # again from that parent (a hot restart), which then drains and exits as usual.
    Scenario(
        "serving_killed_while_parent_drains",
        (
            SERVING_0,
            Write(1),
            wait("child.serving", epoch=1),
            Kill("serving"),
            wait("child.serving", epoch=1, count=2, within_s=SOON),
            wait("child.exited", epoch=0),
            Stop(),
        ),
        Outcome(started=(0, 1, 1), live=(0, 1, 1), serves=body(1), exit_code=0, died=1),
    ),
    # 3a. A draining parent SIGKILLed early dooms its successor (§6): no hot restart from
    # it; the next request is carried out as a full restart to epoch 0. The daemon KILLs
    # the doomed epoch (a TERM would make it tell its dead parent to exit, retry for 10 s
    # and abort, measured) and epoch 0 starts at once: a ~0.1 s outage.
    Scenario(
        "draining_parent_killed_then_request",
        (
            SERVING_0,
            Write(1),
            wait("child.serving", epoch=1),
            Kill("draining"),
            wait("child.drain_cut", epoch=0),
            Write(2),
            wait("restart.full", epoch=1),
            wait("child.serving", epoch=0, count=2, within_s=SOON),
            Stop(),
        ),
        Outcome(
            started=(0, 1, 0),
            live=(0, 1, 0),
            serves=body(2),
            exit_code=0,
            died=1,
            drain_cuts=1,
            full_restarts=1,
        ),
    ),
    # 3b. The same with no request: Envoy aborts the doomed successor about 10 s after its
    # parent-shutdown time (LIVE + 2 + 10 s, §6), and epoch 0 is cold-started.
    Scenario(
        "draining_parent_killed_successor_aborts",
        (
            SERVING_0,
            Write(1),
            wait("child.serving", epoch=1),
            Kill("draining"),
            wait("child.drain_cut", epoch=0),
            wait("child.died", epoch=1, within_s=(10.0, 14.0)),
            wait("child.serving", epoch=0, count=2, within_s=SOON),
            Stop(),
        ),
        Outcome(
            started=(0, 1, 0),
            live=(0, 1, 0),
            serves=body(1),
            exit_code=0,
            died=1,
            drain_cuts=1,
        ),
    ),
    # 3c. A child hung on a parent that does not answer (SIGSTOP, §7) is killed at
    # --start-timeout. Measured: once the parent runs again it answers the dead child,
    # is refused, and retries once a second (still serving). The daemon's retry at the
    # same epoch binds the same socket, gets that stale answer and aborts on it; the
    # parent goes on, and the next retry serves. (With no retry within 10 s the parent
    # itself would abort.)
    Scenario(
        "child_hung_on_frozen_parent",
        (
            SERVING_0,
            Freeze(),
            Write(1),
            wait("child.start_timeout", epoch=1, within_s=(2.0, 4.0)),
            wait("restart.failed", epoch=1),
            Thaw(),
            wait("restart.failed", epoch=1, count=2, within_s=(0.5, 4.0)),
            wait("child.serving", epoch=1, within_s=(1.5, 4.0)),
            wait("child.exited", epoch=0),
            Stop(),
        ),
        Outcome(started=(0, 1, 1, 1), live=(0, 1), serves=body(1), exit_code=0, failed_starts=2),
        start_timeout_s=2.0,
    ),
    # 4. A restart storm: once epoch 1 is starting, ten writes and twenty SIGHUPs in a
    # row. They run as one restart, after epoch 0 has drained (§8): epochs stay
    # consecutive, never more than three processes, the last write serves.
    Scenario(
        "restart_storm",
        (
            SERVING_0,
            Sighup(),
            wait("child.started", epoch=1),
            *(step for v in range(1, 11) for step in (Write(v), Sighup(count=2))),
            wait("child.serving", epoch=2, within_s=(1.5, 5.0)),
            wait("child.exited", epoch=1),
            Quiet(2.5),
            Stop(),
        ),
        Outcome(started=(0, 1, 2), live=(0, 1, 2), serves=body(10), exit_code=0),
    ),
    # 5a. SIGTERM while epoch 1 is still initializing: every Envoy is TERMed and exits
    # (§2: at once, no drain), exit 0, nothing left. Epoch 0 served until then.
    # Measured: on its way out the child tells its parent to exit; when the parent's own
    # TERM has already ended it (a loaded box), the child retries for 10 s and aborts
    # (exit 0 all the same: nobody was KILLed). The model has the child win that race;
    # the daemon TERMs both at once, oldest first (reported with this file's commit).
    Scenario(
        "sigterm_mid_start",
        (
            SERVING_0,
            Write(1, slow=True),
            wait("child.started", epoch=1),
            AwaitInitializing(1),
            Stop(within_s=STOP_RACE),
        ),
        Outcome(started=(0, 1), live=(0,), serves=body(0), exit_code=0),
    ),
    # 5b. SIGTERM while epoch 0 drains: both are TERMed together, and both exit (§6),
    # with the same race as 5a.
    Scenario(
        "sigterm_mid_drain",
        (
            SERVING_0,
            Write(1),
            wait("child.serving", epoch=1),
            Stop(within_s=STOP_RACE),
        ),
        Outcome(started=(0, 1), live=(0, 1), serves=body(1), exit_code=0),
    ),
)
