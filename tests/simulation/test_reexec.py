"""Re-exec in place in the simulation: the core's state serialised at a quiet moment
and restored into a fresh core, while the modelled Envoys carry on."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from envoy_autoreload.generations import Outcome
from tests.simulation.harness import Knobs, Simulation
from tests.simulation.model import ProcState


@pytest.fixture
def sim() -> Iterator[Simulation]:
    simulation = Simulation(Knobs())
    simulation.begin()
    simulation.advance(1.0)
    yield simulation
    simulation.close()


def serving(sim: Simulation) -> tuple[int, int] | None:
    proc = sim.world.model.serving()
    return (proc.epoch, proc.pid) if proc is not None else None


def test_a_reexec_keeps_the_same_envoy_and_applies_the_next_change(sim: Simulation) -> None:
    before = serving(sim)
    assert sim.reexec()
    assert serving(sim) == before
    assert not [s for s in sim.world.model.signals if s.pid == before[1]]  # type: ignore[index]
    new = sim.write(good=True)
    sim.advance(1.0)
    proc = sim.world.model.serving()
    assert proc is not None and proc.content == new and proc.epoch == 1


def test_a_draining_parent_is_still_tracked_after_a_reexec(sim: Simulation) -> None:
    sim.write(good=True)
    sim.advance(1.0)
    assert [p.state for p in sim.world.model.alive()] == [ProcState.DRAINING, ProcState.LIVE]
    assert sim.reexec()
    sim.advance(5.0)  # epoch 0 ends its drain at its parent-shutdown time
    assert [p.epoch for p in sim.world.model.alive()] == [1]
    assert not sim.supervisor.internal_errors
    sim.write(good=True)
    sim.advance(1.0)
    assert serving(sim) is not None and serving(sim)[0] == 2  # type: ignore[index]


def test_probation_goes_on_across_a_reexec(sim: Simulation) -> None:
    sick = sim.write(good=True, healthy=False)
    sim.advance(0.4)  # LIVE; on probation; no verdict yet
    assert sim.outcome(sick) is Outcome.PROBATION
    assert sim.reexec()
    sim.advance(5.0)
    assert sim.outcome(sick) is not Outcome.GOOD, "the new image forgot the probation"


def test_a_sighup_pending_at_the_exec_is_handled_by_the_new_image(sim: Simulation) -> None:
    before = serving(sim)
    sim.world.reactor.pending_signals.add(signal.SIGHUP)  # arrived while blocked
    assert sim.reexec()
    sim.advance(1.0)
    after = serving(sim)
    assert before is not None and after is not None and after[0] == before[0] + 1


def test_no_reexec_while_a_restart_is_in_flight(sim: Simulation) -> None:
    sim.gate.duration_s = 2.0
    sim.send(signal.SIGHUP)
    assert not sim.reexec(), "a validation would have had to cross the exec"
    sim.advance(3.0)
    assert sim.reexec()


def test_a_fault_that_repeats_makes_the_daemon_reexec_with_envoy_untouched(
    sim: Simulation,
) -> None:
    """Issue "re-exec in place", the fault path: the same internal error three times
    within a minute is not limped on; a fresh core takes over the same Envoys."""
    before = serving(sim)
    faults = {"n": 0}

    def broken(reason: str, changed: list[str] | None = None, events: int | None = None) -> int:
        faults["n"] += 1
        raise RuntimeError("injected fault in a handler")

    sim.supervisor.request_restart = broken  # type: ignore[method-assign]
    sim.tolerate_internal_errors = True
    for _ in range(3):
        sim.send(signal.SIGHUP)
        sim.advance(1.0)
    assert faults["n"] == 3
    assert sim.reexecs == 1, "three faults in a minute did not re-exec the daemon"
    assert serving(sim) == before
    sim.tolerate_internal_errors = False
    sim.send(signal.SIGHUP)
    sim.advance(1.0)
    assert serving(sim) is not None and serving(sim)[0] == before[0] + 1  # type: ignore[index]


def test_the_crash_pacing_goes_on_across_a_reexec(sim: Simulation) -> None:
    """Quick deaths in a row back off; a re-exec between them must not reset that (an
    Envoy that keeps dying soon after LIVE is a crash loop, whoever watches it)."""
    for _ in range(2):  # two quick deaths: the second already waits 1 s
        assert sim.kill_proc(ProcState.LIVE)
        sim.advance(3.0)
        assert serving(sim) is not None
    assert sim.reexec()
    assert sim.kill_proc(ProcState.LIVE)
    died_at = sim.now
    sim.advance(5.0)
    restarted = [s.at for s in sim.world.spawned if s.at >= died_at]
    assert restarted and restarted[0] - died_at >= 2.0, "the pacing was reset by the re-exec"
