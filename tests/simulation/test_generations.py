"""Generations in the simulation: probation after LIVE, rollback to the last good config,
and recovery that starts snapshots, never the files on disk (REVIEW-core finding 8a).

Virtual time: a 10 s health window costs nothing.
"""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator

import pytest

from envoy_autoreload.generations import Outcome
from envoy_autoreload.probation import FINAL_STRETCH_S
from tests.simulation.harness import Knobs, Simulation
from tests.simulation.model import Content, ProcState

WINDOW_S = 10.0


@pytest.fixture
def sims() -> Iterator[list[Simulation]]:
    made: list[Simulation] = []
    yield made
    for sim in made:
        sim.close()


def settled(sims: list[Simulation], **knobs: object) -> Simulation:
    """A daemon whose epoch 0 passed probation: there is a last good config."""
    sim = Simulation(Knobs(**knobs))  # type: ignore[arg-type]
    sims.append(sim)
    sim.begin()
    sim.advance(WINDOW_S + 1.0)
    assert sim.outcome(serving_content(sim)) is Outcome.GOOD
    return sim


def serving_content(sim: Simulation) -> Content | None:
    proc = sim.world.model.serving()
    return proc.content if proc is not None else None


def test_a_push_that_fails_probation_is_rolled_back_and_the_files_stay(
    sims: list[Simulation],
) -> None:
    sim = settled(sims)
    good = serving_content(sim)
    sick = sim.write(good=True, healthy=False)  # validates, goes LIVE, answers 503
    sim.advance(1.0)
    assert serving_content(sim) == sick
    sim.advance(3.0)  # three failed rounds 0.5 s apart, then a hot restart
    assert serving_content(sim) == good, "not rolled back to the last good config"
    assert sim.world.model.serving().epoch == 2  # type: ignore[union-attr]
    assert sim.world.disk == sick, "the files on disk were touched"
    assert sim.outcome(sick) is Outcome.FAILED
    fixed = sim.write(good=True)
    sim.advance(1.0)
    assert serving_content(sim) == fixed, "the next good push is not served"


def test_the_failed_bytes_are_not_tried_again_until_forced(sims: list[Simulation]) -> None:
    sim = settled(sims)
    good = serving_content(sim)
    sim.write(good=True, healthy=False)
    sim.advance(5.0)
    assert serving_content(sim) == good
    spawned = len(sim.world.spawned)
    sim.send(signal.SIGHUP)
    sim.advance(2.0)
    assert len(sim.world.spawned) == spawned, "the config that failed probation ran again"
    client = sim.control_reload(force=True)
    sim.advance(1.0)
    assert len(sim.world.spawned) == spawned + 1, "reload --force did not try it again"
    assert b'"ok": true' in client.read()


def test_a_generation_that_dies_on_probation_gives_way_to_the_last_good(
    sims: list[Simulation],
) -> None:
    sim = settled(sims)
    good = serving_content(sim)
    bad = sim.write(good=True)
    sim.advance(1.0)
    assert serving_content(sim) == bad
    sim.advance(1.5)  # 2 s after LIVE: it crashes under traffic
    assert sim.kill_proc(ProcState.LIVE, signal.SIGSEGV)
    sim.advance(5.0)
    assert not sim.exited, "the crash budget ended the daemon"
    assert serving_content(sim) == good
    assert sim.outcome(bad) is Outcome.FAILED


def test_recovery_starts_what_served_not_the_files_on_disk(sims: list[Simulation]) -> None:
    """Finding 8a: the serving Envoy crashes while a broken config sits on disk."""
    sim = settled(sims, watch=False)
    good = serving_content(sim)
    sim.world.disk = Content(sim.next_version, good=False)  # pushed, no SIGHUP yet
    assert sim.kill_proc(ProcState.LIVE, signal.SIGSEGV)
    sim.advance(5.0)
    assert serving_content(sim) == good
    assert not sim.exited


def test_with_no_rollback_the_failed_generation_keeps_serving(sims: list[Simulation]) -> None:
    sim = settled(sims, rollback=False)
    sick = sim.write(good=True, healthy=False)
    sim.advance(WINDOW_S)
    assert serving_content(sim) == sick


def test_without_a_good_generation_there_is_nothing_to_roll_back_to(
    sims: list[Simulation],
) -> None:
    sim = Simulation(Knobs())
    sims.append(sim)
    sim.begin()
    sim.advance(1.0)  # epoch 0 still on probation: nothing has passed yet
    sick = sim.write(good=True, healthy=False)
    sim.advance(5.0)
    assert serving_content(sim) == sick
    assert not sim.exited


def test_stopping_the_daemon_fails_no_probation(sims: list[Simulation]) -> None:
    """Found in the golden logs: the TERMed epoch on probation counted as a crash."""
    sim = settled(sims)
    new = sim.write(good=True)
    sim.advance(1.0)
    assert serving_content(sim) == new
    sim.check_stops()
    assert sim.outcome(new) is Outcome.PROBATION


def test_a_config_that_does_not_validate_at_start_up_starts_the_last_good(
    sims: list[Simulation],
) -> None:
    """A bad push while the daemon was down (or a reboot mid-push): history outlives the
    daemon, so Envoy starts on the last good config instead of not at all."""
    sim = Simulation(Knobs())
    sims.append(sim)
    good = Content(0)
    data = repr(good).encode()
    sim.world.by_bytes[data] = good
    assert sim.store is not None
    sim.store.record(sim.store.snapshot(data), Outcome.GOOD)
    sim.world.disk = Content(1, good=False)
    sim.begin()
    sim.advance(1.0)
    assert serving_content(sim) == good
    assert sim.world.disk == Content(1, good=False)


def test_recovery_starts_what_served_then_the_validated_request_once(
    sims: list[Simulation],
) -> None:
    """v1 passed the gate but its start failed (a port held elsewhere); epoch 0 dies
    during the retry's backoff. Recovery starts v0, which served, and the owed request
    for v1 then starts v1 once."""
    sim = settled(sims)
    v0 = serving_content(sim)
    sim.world.model.port_conflict = True
    v1 = sim.write(good=True)
    sim.advance(0.5)
    sim.world.model.port_conflict = False
    before = len(sim.world.spawned)
    assert sim.kill_proc(ProcState.LIVE)
    sim.advance(30.0)
    after = [s.content for s in sim.world.spawned[before:]]
    assert after == [v0, v1], after
    assert serving_content(sim) == v1


def test_a_rollback_waiting_for_the_gate_survives_a_failed_validation(
    sims: list[Simulation],
) -> None:
    """The sick push fails probation while a newer push (broken) is being validated: the
    newer one's refusal must not cancel the rollback."""
    sim = settled(sims)
    good = serving_content(sim)
    sim.write(good=True, healthy=False)
    sim.advance(1.0)  # LIVE, on probation
    sim.gate.duration_s = 3.0
    sim.write(good=False)  # validated for 3 s, while probation fails
    sim.advance(10.0)
    assert serving_content(sim) == good, "the refused push cancelled the rollback"


def test_an_operators_rollback_is_answered_once_it_serves(sims: list[Simulation]) -> None:
    sim = settled(sims)
    first = serving_content(sim)
    sim.write(good=True)
    sim.advance(WINDOW_S + 1.0)
    client = sim.control_rollback()
    assert client.answer == b""
    sim.advance(1.0)
    assert b"already serving" in client.read(), "the last good is what serves"
    assert first is not None
    sha = hashlib.sha256(repr(first).encode()).hexdigest()
    client = sim.control(f"rollback {sha[:8]}\n".encode())
    sim.advance(5.0)
    assert b'"ok": true' in client.read()
    assert serving_content(sim) == first


def test_a_generation_replaced_on_probation_is_superseded_not_good(
    sims: list[Simulation],
) -> None:
    sim = settled(sims)
    first = sim.write(good=True)
    sim.advance(1.0)
    second = sim.write(good=True)
    sim.advance(4.0)  # it waits for epoch 0's drain (3 s), then goes LIVE
    assert serving_content(sim) == second
    assert sim.outcome(first) is Outcome.SUPERSEDED
    assert sim.outcome(second) is Outcome.PROBATION
    sim.advance(WINDOW_S)
    assert sim.outcome(second) is Outcome.GOOD


def test_an_operators_rollback_killed_mid_start_is_answered_as_failed(
    sims: list[Simulation],
) -> None:
    """The serving Envoy dies while the rollback's epoch starts from it: that epoch can
    never serve (its parent is gone, §5) and is stopped. It used to be requeued as an
    ordinary request, which then passed the gate for the files and was answered as a
    success although nothing was rolled back."""
    sim = settled(sims)
    first = serving_content(sim)
    assert first is not None
    sim.write(good=True)
    sim.advance(WINDOW_S + 1.0)
    sha = hashlib.sha256(repr(first).encode()).hexdigest()
    client = sim.control(f"rollback {sha[:8]}\n".encode())
    for _ in range(100):
        if any(p.state is ProcState.INITIALIZING for p in sim.world.model.alive()):
            break
        sim.advance(0.005)
    assert sim.kill_proc(ProcState.LIVE), "the rollback's parent was not found serving"
    sim.advance(10.0)
    answer = client.read()
    assert answer and b'"ok": true' not in answer, answer
    assert b"rollback" in answer, answer


def test_a_slow_next_start_does_not_fail_the_generation_on_probation(
    sims: list[Simulation],
) -> None:
    """From ~60 ms after its start, the next epoch answers admin, PRE_INITIALIZING at its
    own epoch, for as long as it loads (§15): that says nothing of the generation still
    on probation, which used to fail on it (3 rounds: 1.5 s) and be recorded FAILED."""
    sim = settled(sims)
    on_probation = sim.write(good=True)
    sim.advance(1.0)
    assert serving_content(sim) == on_probation
    slow = Content(sim.next_version, init_s=4.0)  # waits for CDS (§8, §15)
    sim.next_version += 1
    sim.revert_to(slow)
    sim.advance(3.5)  # its start waited for epoch 0 to exit (parent-shutdown 3 s)
    assert sim.supervisor.roster.starting() is not None, "the slow epoch is not loading"
    sim.advance(2.0)  # the slow epoch answers admin for 2 s: four rounds
    assert sim.outcome(on_probation) is not Outcome.FAILED
    sim.advance(3.0)
    assert serving_content(sim) == slow, "the slow push is not what serves"
    assert sim.outcome(on_probation) is not Outcome.FAILED


def test_a_start_reaches_the_disk_once_live_not_while_envoy_starts(
    sims: list[Simulation],
) -> None:
    """Issue 16, goal 4: four fsyncs right after the spawn shared the two cores with the
    starting Envoy. The history names a config once its start resolved (here LIVE, on
    probation), and only after its snapshot's bytes are on disk."""
    sim = settled(sims)
    history = sim.store.state_dir / "history.json"  # type: ignore[union-attr]
    slow = Content(sim.next_version, init_s=1.0)
    sim.next_version += 1
    sim.revert_to(slow)
    sha = hashlib.sha256(repr(slow).encode()).hexdigest()
    sim.advance(1.0)
    assert sim.supervisor.roster.starting() is not None, "the push is not starting"
    assert sha not in history.read_text(), "written while its Envoy starts"
    sim.advance(1.5)
    assert serving_content(sim) == slow
    assert sha in history.read_text(), "LIVE, and still not in the history on disk"
    assert sim.outcome(slow) is Outcome.PROBATION


def test_the_windows_last_rounds_are_final(sims: list[Simulation]) -> None:
    """The rounds begun in the window's last `FINAL_STRETCH_S` read the listener counter
    whatever `/stats` costs (health.py); the ones before may let it rest."""
    sim = settled(sims)
    rounds = [(when, final) for when, epoch, final in sim.health.begun if epoch == 0]
    window_end = rounds[0][0] + WINDOW_S  # the first round is begun at LIVE
    assert [final for _, final in rounds] == [
        when + FINAL_STRETCH_S >= window_end for when, _ in rounds
    ]
    assert sum(final for _, final in rounds) >= 2, "no final round answered in the window"
    assert not rounds[0][1], "a final round from the start"
