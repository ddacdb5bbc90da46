"""When the LIVE probe first asks a starting epoch (issue 16): not before most of the
last start's spawn-to-LIVE time. Every early probe is answered by an Envoy at work: the
parent, on the main thread the child's hot-restart requests wait on, or the child
while it loads. Never later than 0.2 s, however slow the last start was."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from envoy_autoreload.launcher import FIRST_PROBE_MAX_S, FIRST_PROBE_S, FIRST_PROBE_SHARE
from tests.simulation.harness import Knobs, Simulation
from tests.simulation.model import Content


@pytest.fixture
def sim() -> Iterator[Simulation]:
    made = Simulation(Knobs(debounce_s=0.05))
    made.begin()
    made.advance(1.0)
    yield made
    made.close()


def _spawned_at(sim: Simulation, epoch: int) -> float:
    return next(s.at for s in sim.world.spawned if s.epoch == epoch)


def _first_probe_after_spawn(sim: Simulation, epoch: int) -> float:
    first = min(at for e, at in sim.facts.asked if e == epoch)
    return first - _spawned_at(sim, epoch)


def _startup(sim: Simulation, epoch: int) -> float:
    """Spawn to the probe that saw it LIVE."""
    return max(at for e, at in sim.facts.asked if e == epoch) - _spawned_at(sim, epoch)


def test_the_first_start_is_probed_at_once_and_the_next_after_most_of_its_time(
    sim: Simulation,
) -> None:
    assert _first_probe_after_spawn(sim, 0) == pytest.approx(FIRST_PROBE_S)
    sim.write(good=True)
    sim.advance(2.0)
    assert sim.world.model.serving() is not None
    expected = FIRST_PROBE_SHARE * _startup(sim, 0)
    assert expected > FIRST_PROBE_S
    assert _first_probe_after_spawn(sim, 1) == pytest.approx(expected)


def test_after_a_slow_start_the_first_probe_still_comes_early_enough(sim: Simulation) -> None:
    sim.revert_to(Content(sim.next_version, init_s=3.0))  # its Envoy takes 3 s to load
    sim.next_version += 1
    sim.advance(10.0)
    assert _startup(sim, 1) > 3.0
    sim.write(good=True)
    sim.advance(10.0)
    assert _first_probe_after_spawn(sim, 2) == pytest.approx(FIRST_PROBE_MAX_S)
