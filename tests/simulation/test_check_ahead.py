"""The gate's validation started while a burst's debounce waits (`check_ahead.py`,
issue 16), in virtual time: validation (0.04 s here) no longer delays a restart whose
debounce (0.3 s) is longer, a storm costs a few validations and not one per event,
and what starts is still only what passed (the harness checks it at every spawn)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from envoy_autoreload.errors import ExitCode
from envoy_autoreload.loop import DeadlineReached, Event
from envoy_autoreload.states import Timer
from tests.simulation.harness import Knobs, Simulation

DEBOUNCE_S = 0.3


@pytest.fixture
def sim() -> Iterator[Simulation]:
    made = Simulation(Knobs(debounce_s=DEBOUNCE_S))
    made.begin()
    made.advance(1.0)
    yield made
    made.close()


def started_at(sim: Simulation, epoch: int) -> float:
    return next(s.at for s in sim.world.spawned if s.epoch == epoch)


def test_a_burst_starts_when_it_is_due_not_a_validation_later(sim: Simulation) -> None:
    written_at = sim.now
    sim.write(good=True)
    sim.advance(1.0)
    assert sim.gate.ahead_started == 1
    took = started_at(sim, 1) - written_at
    assert took == pytest.approx(DEBOUNCE_S, abs=0.005), "the validation ran after the debounce"


def test_a_storm_starts_a_few_checks_ahead_and_the_last_content_starts(sim: Simulation) -> None:
    for _ in range(20):
        last = sim.write(good=True)
        sim.advance(0.01)
    sim.advance(2.0)
    assert 1 <= sim.gate.ahead_started <= 3, sim.gate.ahead_started
    serving = sim.world.model.serving()
    assert serving is not None and serving.epoch == 1 and serving.content == last


def test_a_storm_longer_than_its_checks_still_starts_when_it_is_due(sim: Simulation) -> None:
    """A storm of 40 writes over 0.4 s: started at once, all three runs ahead went
    stale within it, and the final content was validated only once the burst was due.
    A later run waits until the files rested (`AHEAD_QUIET_S`), so the final content's
    verdict is in before the debounce ends (issue 16, `bench/storm.py`)."""
    for _ in range(40):
        last = sim.write(good=True)
        written_at = sim.now
        sim.advance(0.01)
    sim.advance(2.0)
    assert 1 <= sim.gate.ahead_started <= 3, sim.gate.ahead_started
    took = started_at(sim, 1) - written_at
    assert took == pytest.approx(DEBOUNCE_S, abs=0.005), "the last content's check came late"
    serving = sim.world.model.serving()
    assert serving is not None and serving.epoch == 1 and serving.content == last


def test_a_bad_write_in_the_debounce_is_what_the_gate_judges(sim: Simulation) -> None:
    """The good content's check ran ahead and passed; the bad write after it is the
    burst's content, so the pass is never taken and nothing starts."""
    sim.write(good=True)
    sim.advance(0.1)  # the check of the good content is done
    sim.write(good=False)
    sim.advance(2.0)
    assert sim.gate.ahead_started == 2
    assert [s.epoch for s in sim.world.spawned] == [0]


def test_the_named_file_going_bad_after_the_check_ahead_passed_is_judged(
    sim: Simulation,
) -> None:
    """The config's check ahead passes; then the file it names goes bad, an event within
    the debounce. Taking the pass would start an Envoy that cannot load (the harness's
    invariant 5 says so at the spawn); the burst's verdict is about the bad file."""
    sim.write(good=True)
    sim.advance(0.1)  # its check ahead (0.04 s) passed
    sim.write_named(False)
    sim.advance(2.0)
    assert [s.epoch for s in sim.world.spawned] == [0]
    sim.write_named(True)
    sim.advance(2.0)
    serving = sim.world.model.serving()
    assert serving is not None and serving.epoch == 1


def test_a_verdict_ready_at_the_deadline_starts_in_the_deadlines_own_turn(
    sim: Simulation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The burst is due and its check passed ahead: the gate decides at once, and the
    start follows in the same turn. A trip back through the loop (`Timer.ADVANCE`)
    cost the start 0.3 ms on these machines (issue 16)."""
    turns: list[tuple[list[Event], int]] = []
    handle = sim.supervisor.handle

    def recorded(events: list[Event]) -> ExitCode | None:
        code = handle(events)
        turns.append((events, len(sim.world.spawned)))
        return code

    monkeypatch.setattr(sim.supervisor, "handle", recorded)
    sim.write(good=True)
    sim.advance(1.0)
    assert sim.gate.ahead_started == 1
    turn = next(events for events, spawned in turns if spawned == 2)
    assert DeadlineReached(Timer.DEBOUNCE) in turn, turn
