"""Generated interleavings of everything that can happen to the daemon, checked against
the invariants of DESIGN-core §3 after every event the real core handles.

Hypothesis drives `Simulation` (harness.py) with rules for file changes (good, broken,
reverted, deleted), signal floods, control reloads, deaths in every state, port
conflicts, slow and hung validation, binary swaps, an unresponsive parent, an admin
that is not where we look, and time passing between any two. At the end of each run the
faults stop and the daemon must converge (invariant 7), then stop cleanly (invariant 8).

`ENVOY_AUTORELOAD_SIM_EXAMPLES` raises the number of runs (default 800, 10-30 s on
two cores); `ENVOY_AUTORELOAD_SIM_STEPS` the steps per run (default 40). A long run:

    ENVOY_AUTORELOAD_SIM_EXAMPLES=20000 pytest tests/simulation -p no:cacheprovider
"""

from __future__ import annotations

import os
import signal
from typing import Literal

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.simulation.harness import Knobs, Simulation
from tests.simulation.model import Content, ProcState

EXAMPLES = int(os.environ.get("ENVOY_AUTORELOAD_SIM_EXAMPLES", "800"))
STEPS = int(os.environ.get("ENVOY_AUTORELOAD_SIM_STEPS", "40"))

PAUSES = st.sampled_from([0.0, 0.001, 0.01, 0.04, 0.1, 0.3, 0.35, 1.0, 2.9, 3.1, 5.0, 11.0, 61.0])


class DaemonInAWorld(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sim: Simulation | None = None
        self.history: list[Content | None] = []

    @initialize(
        max_drain_wait_s=st.sampled_from([0.0, 2.0, 60.0]),
        start_timeout_s=st.sampled_from([5.0, 60.0]),
        parent_shutdown_s=st.sampled_from([1.0, 3.0]),
        debounce_s=st.sampled_from([0.05, 0.3]),
        watch=st.booleans(),
        on_incompatible_binary=st.sampled_from(["refuse", "restart"]),
        build_s=st.sampled_from([0.0, 0.0, 0.05, 2.0]),
    )
    def start(
        self,
        max_drain_wait_s: float,
        start_timeout_s: float,
        parent_shutdown_s: float,
        debounce_s: float,
        watch: bool,
        on_incompatible_binary: Literal["refuse", "restart"],
        build_s: float = 0.0,
    ) -> None:
        knobs = Knobs(
            max_drain_wait_s=max_drain_wait_s,
            start_timeout_s=start_timeout_s,
            parent_shutdown_s=parent_shutdown_s,
            debounce_s=debounce_s,
            watch=watch,
            on_incompatible_binary=on_incompatible_binary,
            build_s=build_s,  # the first reading of the files while epoch 0 starts
        )
        self.sim = Simulation(knobs)
        self.sim.begin()
        self.history.append(self.sim.world.disk)

    @property
    def s(self) -> Simulation:
        assert self.sim is not None
        return self.sim

    def running(self) -> bool:
        return self.sim is not None and not self.sim.exited

    # -- content -------------------------------------------------------------------
    @precondition(running)
    @rule(good=st.booleans(), healthy=st.sampled_from([True, True, True, False]))
    def write(self, good: bool, healthy: bool = True) -> None:
        self.history.append(self.s.write(good, healthy))

    @precondition(running)
    @rule(ok=st.sampled_from([True, True, False]))
    def write_named(self, ok: bool) -> None:
        self.s.write_named(ok)

    @rule(back=st.integers(min_value=1, max_value=4))
    def revert(self, back: int) -> None:
        self.s.revert_to(self.history[max(0, len(self.history) - 1 - back)])

    @precondition(running)
    @rule()
    def delete_config(self) -> None:
        self.s.delete_config()
        self.history.append(None)

    # -- signals and requests ----------------------------------------------------------
    @precondition(running)
    @rule(
        signum=st.sampled_from([signal.SIGHUP, signal.SIGUSR1]),
        count=st.sampled_from([1, 1, 1, 5]),
    )
    def signal_daemon(self, signum: signal.Signals, count: int) -> None:
        for _ in range(count):
            self.s.send(signum)

    def restarting(self) -> bool:
        return self.running() and self.s.supervisor.roster.starting() is not None

    @precondition(restarting)
    @rule(signum=st.sampled_from([signal.SIGTERM, signal.SIGINT]))
    def stop_mid_start(self, signum: signal.Signals) -> None:
        """SIGTERM/SIGINT at any other moment is the teardown's own check."""
        self.s.send(signum)

    @precondition(running)
    @rule(force=st.booleans())
    def control_reload(self, force: bool) -> None:
        self.s.control_reload(force)

    @precondition(running)
    @rule()
    def control_rollback(self) -> None:
        self.s.control_rollback()

    @precondition(running)
    @rule()
    def reexec(self) -> None:
        """The daemon re-executes itself in place (at its next quiet moment)."""
        self.s.reexec()

    # -- faults ---------------------------------------------------------------------------
    @precondition(running)
    @rule(
        state=st.sampled_from(list(ProcState)),
        signum=st.sampled_from([signal.SIGKILL, signal.SIGABRT, signal.SIGTERM]),
    )
    def kill(self, state: ProcState, signum: signal.Signals) -> None:
        self.s.kill_proc(state, signum)

    @precondition(running)
    @rule(on=st.booleans())
    def port_conflict(self, on: bool) -> None:
        self.s.world.model.port_conflict = on

    @precondition(running)
    @rule(duration_s=st.sampled_from([0.04, 2.0, 40.0]), hangs=st.booleans())
    def validation_speed(self, duration_s: float, hangs: bool) -> None:
        self.s.gate.duration_s = duration_s
        self.s.gate.hangs = hangs

    @precondition(running)
    @rule(ok=st.booleans(), hot_restart_version=st.sampled_from(["11.104", "12.0"]))
    def swap_binary(self, ok: bool, hot_restart_version: str) -> None:
        world = self.s.world
        world.binary_ok = ok
        world.binary_hrv = hot_restart_version
        self.s.content.written()  # the binary is watched too

    @precondition(running)
    @rule(on=st.booleans())
    def parent_unresponsive(self, on: bool) -> None:
        self.s.world.model.unresponsive(on)
        self.s.run_until_quiet()

    @precondition(running)
    @rule(state=st.sampled_from([ProcState.DRAINING, ProcState.LIVE, ProcState.INITIALIZING]))
    def wedge(self, state: ProcState) -> None:
        """A process stops answering (SIGSTOP, a deadlock), §7."""
        procs = [p for p in self.s.world.model.alive() if p.state is state]
        if procs:
            self.s.world.model.wedge(procs[0])

    @precondition(running)
    @rule(on=st.booleans())
    def admin_blind(self, on: bool) -> None:
        self.s.facts.admin_blind = on

    # -- time ------------------------------------------------------------------------------
    @rule(seconds=PAUSES)
    def wait(self, seconds: float) -> None:  # also after the daemon exited: a no-op
        self.s.advance(seconds)

    @invariant()
    def safe(self) -> None:
        if self.sim is not None:
            self.sim.check_safety()

    def teardown(self) -> None:
        sim = self.sim
        if sim is None:
            return
        try:
            # The binary on disk matches what runs: with --on-incompatible-binary=refuse
            # an incompatible one is refused on purpose, and that is no fault to heal.
            sim.world.binary_hrv = sim.world.model.shm_version or "11.104"
            sim.check_converges()
            sim.check_stops()
        finally:
            sim.close()


DaemonInAWorld.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDaemonInAWorld = DaemonInAWorld.TestCase
