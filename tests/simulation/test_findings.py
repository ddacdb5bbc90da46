"""REVIEW-core findings the model can show, each replayed in the simulation.

Every test here failed on the core before its fix (commit d2579bd) and passes after;
the finding number is in the test's name. Virtual time makes each a few milliseconds.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.simulation.harness import Knobs, Simulation
from tests.simulation.model import Content, ProcState
from tests.simulation.test_stateful import DaemonInAWorld


@pytest.fixture
def make_sim() -> Iterator[type[Simulation] | object]:
    made: list[Simulation] = []

    def make(**knobs: object) -> Simulation:
        sim = Simulation(Knobs(**knobs))  # type: ignore[arg-type]
        made.append(sim)
        sim.begin()
        sim.advance(1.0)
        return sim

    yield make
    for sim in made:
        sim.close()


def serving_epoch(sim: Simulation) -> int | None:
    proc = sim.world.model.serving()
    return proc.epoch if proc is not None else None


def test_finding_2_drain_wait_fires_without_watch(make_sim: object) -> None:
    """--config without --watch: a restart during a drain waits --max-drain-wait, not
    the whole parent-shutdown time."""
    sim: Simulation = make_sim(watch=False, max_drain_wait_s=2.0, parent_shutdown_s=120.0)  # type: ignore[operator]
    sim.send(signal.SIGHUP)
    sim.advance(1.0)
    assert serving_epoch(sim) == 1
    sim.send(signal.SIGHUP)
    sim.advance(3.0)
    assert serving_epoch(sim) == 2, "the second restart still waits for the 120 s drain"


def test_finding_3_a_child_that_took_over_is_not_killed_at_the_deadline(
    make_sim: object,
) -> None:
    """Admin is not where we look, but the child took over (the flag is clear): killing
    it would strand its parent, which refuses new connections."""
    sim: Simulation = make_sim(start_timeout_s=5.0)  # type: ignore[operator]
    sim.facts.admin_blind = True
    sim.write(good=True)
    sim.advance(10.0)
    model = sim.world.model
    assert serving_epoch(sim) == 1, "the LIVE child was killed at --start-timeout"
    assert not [s for s in model.signals if s.signum == signal.SIGKILL]
    serving = sim.supervisor.roster.serving()
    assert serving is not None and serving.epoch == 1


def test_finding_9_a_revert_drops_the_stale_plan_and_tells_systemd(make_sim: object) -> None:
    """B validated, its start failed once (a port held elsewhere) and waits out the
    retry backoff; the file goes back to A, which serves: the plan for B is dropped at
    once, systemd gets READY after its RELOADING, and nothing restarts later."""
    sim: Simulation = make_sim()  # type: ignore[operator]
    sim.world.model.port_conflict = True
    sim.write(good=True)  # B
    sim.advance(0.5)
    assert plan_of(sim) is not None  # the retry of B, in its backoff
    sim.world.model.port_conflict = False
    sim.revert_to(sim.world.model.procs[0].content)  # A, what serves
    sim.advance(0.4)
    assert plan_of(sim) is None, "the plan for the reverted content is still there"
    assert sim.notifier.sent[-1] == "READY", sim.notifier.sent
    sim.advance(70.0)
    assert serving_epoch(sim) == 0, "restarted although the content is what serves"


def plan_of(sim: Simulation) -> object:
    return sim.supervisor.plan


def test_finding_14_sigusr1_during_a_start_reaches_the_new_epoch(make_sim: object) -> None:
    sim: Simulation = make_sim()  # type: ignore[operator]
    sim.write(good=True)
    sim.advance(0.3)  # the restart is due at 0.3 s (validated meanwhile, check_ahead.py)
    for _ in range(100):
        if sim.supervisor.roster.starting() is not None:
            break
        sim.advance(0.001)
    assert sim.supervisor.roster.starting() is not None
    sim.send(signal.SIGUSR1)
    sim.advance(1.0)
    assert serving_epoch(sim) == 1
    new = sim.world.model.serving()
    assert new is not None
    usr1 = [s for s in sim.world.model.signals if s.signum == signal.SIGUSR1]
    assert new.pid in {s.pid for s in usr1}, "the new epoch never reopened its logs"


def test_finding_14_a_hung_draining_epoch_does_not_block_restarts_forever(
    make_sim: object,
) -> None:
    """Three alive (N-1 hung in its drain, N draining, N+1 serving): N+2 would share
    N-1's domain socket. N-1 is nobody's parent any more, so it is killed."""
    sim: Simulation = make_sim(max_drain_wait_s=0.0, parent_shutdown_s=3.0)  # type: ignore[operator]
    sim.write(good=True)
    sim.advance(0.5)
    sim.write(good=True)
    sim.advance(0.5)
    model = sim.world.model
    assert serving_epoch(sim) == 2
    # Epoch 0 was cut by epoch 2's start (§8); make epoch 1 hang past its drain.
    one = next(p for p in model.alive() if p.epoch == 1)
    model.wedge(one)  # §7: it never ends its drain, nor obeys a terminate
    sim.write(good=True)
    sim.advance(0.5)
    assert serving_epoch(sim) == 3
    sim.write(good=True)
    sim.advance(30.0)
    assert serving_epoch(sim) == 4, "the hung epoch 1 blocks epoch 4 for ever"


def test_finding_15_requests_faster_than_validation_do_not_starve_the_restart(
    make_sim: object,
) -> None:
    """SIGHUP every second while validation takes two: each validated plan used to be
    superseded by the next request, and nothing ever restarted."""
    sim: Simulation = make_sim()  # type: ignore[operator]
    sim.gate.duration_s = 2.0
    for _ in range(10):
        sim.send(signal.SIGHUP)
        sim.advance(1.0)
    assert serving_epoch(sim) not in (None, 0), "no restart in 10 s of requests"


def test_finding_15_a_config_recreated_during_validation_is_no_validation_failure(
    make_sim: object,
) -> None:
    sim: Simulation = make_sim()  # type: ignore[operator]
    sim.gate.duration_s = 1.0
    sim.gate.read_after_s = 0.5  # Envoy opens the file while it is gone
    content = sim.write(good=True)
    sim.advance(0.35)  # validating the new content until 1.3 s
    assert sim.gate.busy
    sim.delete_config()  # Envoy reads the path while it is gone
    sim.advance(1.5)
    sim.revert_to(content)
    sim.advance(5.0)
    assert sim.telemetry.validation_failures._value.get() == 0
    assert serving_epoch(sim) == 1


def test_containment_a_handler_that_raises_leaves_envoy_serving(make_sim: object) -> None:
    """DESIGN-core §4: a bug in one handler is logged and counted; Envoy keeps serving
    and the next change is still applied."""
    sim: Simulation = make_sim()  # type: ignore[operator]
    calls = {"n": 0}
    original = sim.facts.is_live

    def broken_once(gen: object) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return original(gen)  # type: ignore[arg-type]

    sim.facts.is_live = broken_once  # type: ignore[method-assign]
    sim.tolerate_internal_errors = True
    sim.write(good=True)
    sim.advance(2.0)
    assert len(sim.supervisor.internal_errors) == 1
    assert sim.telemetry.internal_errors._value.get() == 1
    assert serving_epoch(sim) == 1, "the change was not applied after the fault"
    assert not [s for s in sim.world.model.signals if s.signum == signal.SIGKILL]
    assert all(p.state is not ProcState.DEAD or p.epoch == 0 for p in sim.world.model.procs)


def test_finding_8b_content_that_changes_back_during_validation_is_never_started_unvalidated(
    make_sim: object,
) -> None:
    sim: Simulation = make_sim()  # type: ignore[operator]
    sim.gate.read_after_s = 0.2
    sim.gate.duration_s = 1.0
    a = sim.write(good=True)  # A: new, never validated yet
    sim.advance(0.35)  # A is pinned at 0.3 s and being validated
    sim.write(good=True)  # B, which the validator reads at 0.5 s
    sim.advance(0.3)
    sim.revert_to(a)  # back to A before the verdict at 1.3 s
    sim.advance(3.0)
    assert sim.world.model.serving() is not None
    sim.check_safety()  # invariant 5: A started on B's verdict


# -- found by the review of the restructured core (each failed on 83e37d6) -------------


def test_review_an_incompatible_binary_restart_never_signals_a_draining_parent_first(
    make_sim: object,
) -> None:
    """--on-incompatible-binary=restart TERMed every epoch at once, oldest first: the
    draining parent went before its successor, which then retried for 10 s (§6)."""
    sim: Simulation = make_sim(on_incompatible_binary="restart")  # type: ignore[operator]
    sim.write(good=True)
    sim.advance(1.0)  # epoch 1 serves, epoch 0 drains
    sim.world.binary_hrv = "12.0"
    sim.send(signal.SIGHUP)
    sim.advance(2.0)  # invariant 2 is checked at every event
    assert serving_epoch(sim) == 0


def test_review_a_full_restart_never_cold_starts_unvalidated_content(make_sim: object) -> None:
    """A broken push landing while the family stops for a full restart was started as
    if it were the validated batch, then retried until the crash budget ran out."""
    sim: Simulation = make_sim(on_incompatible_binary="restart")  # type: ignore[operator]
    sim.world.binary_hrv = "12.0"
    sim.send(signal.SIGHUP)
    sim.advance(0.041)  # validated, the family is being stopped
    sim.write(good=False)
    sim.advance(20.0)  # invariant 5 is checked at every event
    assert not sim.exited, "the broken push was cold-started until the crash budget ran out"
    serving = sim.world.model.serving()
    assert serving is not None and serving.content is not None and serving.content.good


def test_review_the_request_behind_a_failed_full_restart_is_answered(make_sim: object) -> None:
    sim: Simulation = make_sim(parent_shutdown_s=30.0)  # type: ignore[operator]
    sim.write(good=True)
    sim.advance(1.0)
    assert sim.kill_proc(ProcState.DRAINING)  # epoch 1 is doomed
    sim.advance(0.1)
    sim.world.model.port_conflict = True
    client = sim.control_reload(force=True)  # a full restart, whose epoch 0 fails
    sim.advance(0.5)
    sim.world.model.port_conflict = False
    sim.advance(60.0)
    assert serving_epoch(sim) == 0
    assert b'"ok": true' in client.read(), "the reload behind the full restart got no answer"


def test_review_a_fault_contained_in_exit_handling_still_recovers(make_sim: object) -> None:
    sim: Simulation = make_sim()  # type: ignore[operator]
    sim.tolerate_internal_errors = True
    recovery = sim.supervisor._exits._recovery
    original = recovery.budget_spent
    calls: list[str] = []

    def raises_once(what: str) -> bool:
        calls.append(what)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return original(what)

    recovery.budget_spent = raises_once  # type: ignore[method-assign]
    assert sim.kill_proc(ProcState.LIVE)
    sim.advance(120.0)
    assert len(sim.supervisor.internal_errors) == 1
    assert serving_epoch(sim) is not None, "nothing serves after a contained fault"


def test_review_a_requeued_retry_of_what_serves_restarts_nothing(make_sim: object) -> None:
    """Without generations recovery starts the files, v1, and the retry of v1 is then
    what serves. (With them, recovery starts v0, what served, and v1 follows once:
    `test_generations.py`.)"""
    sim: Simulation = make_sim(generations=False)  # type: ignore[operator]
    sim.world.model.port_conflict = True
    sim.write(good=True)  # its start fails: a retry is planned
    sim.advance(0.5)
    sim.world.model.port_conflict = False
    assert sim.kill_proc(ProcState.LIVE)  # epoch 0 dies during the backoff
    sim.advance(30.0)
    served = [(s.epoch, s.content) for s in sim.world.spawned]
    assert served.count(served[-1]) == 1, f"the same content started twice: {served}"


# -- found by the long simulation run (each failed on 83e37d6) ----------------------------


def test_longrun_a_successor_that_took_over_and_died_unseen_is_no_failed_start() -> None:
    """Hypothesis's shortest sequence (seed 20261223): epoch 1 went LIVE in Envoy and
    was killed before a probe saw it, leaving epoch 0 draining for ever and refusing new
    connections, while the daemon counted epoch 0 as serving and only planned a hot
    retry (which a failed validation then dropped). Now the parent counts as dead and
    recovery starts at once."""
    machine = DaemonInAWorld()
    machine.start(
        max_drain_wait_s=0.0,
        start_timeout_s=5.0,
        parent_shutdown_s=1.0,
        debounce_s=0.05,
        watch=False,
        on_incompatible_binary="refuse",
    )
    machine.signal_daemon(count=1, signum=signal.SIGHUP)
    machine.wait(seconds=0.1)
    machine.delete_config()
    machine.wait(seconds=0.04)
    machine.kill(signum=signal.SIGKILL, state=ProcState.LIVE)
    machine.teardown()  # invariants 7 and 8


@pytest.mark.parametrize("moment", ["starting", "draining"])
def test_ci_sigterm_during_a_restart_lets_each_parent_leave_on_its_childs_request(
    make_sim: object, moment: str
) -> None:
    """Seen in CI on the real Envoy: the TERMed new epoch asks its parent to exit on its
    way out, and a SIGTERM sent to that parent as soon as the child was reaped found it
    without signal handlers and killed it (rc -15). Every Envoy leaves with rc 0."""
    sim: Simulation = make_sim()  # type: ignore[operator]
    if moment == "starting":
        sim.world.disk = Content(sim.next_version, good=True, init_s=30.0)  # §15: slow CDS
        sim.next_version += 1
        sim.content.written()
        sim.advance(1.0)
        assert sim.supervisor.roster.starting() is not None
    else:
        sim.write(good=True)
        sim.advance(1.0)
        assert serving_epoch(sim) == 1
    sim.check_stops()
    statuses = {p.epoch: p.returncode for p in sim.world.model.procs}
    assert statuses == {0: 0, 1: 0}, statuses


def test_issue_16_a_request_while_the_files_are_first_read_waits_for_them(
    make_sim: object,
) -> None:
    """Envoy first: epoch 0 starts while the files are read (2 s here); a SIGHUP and a
    write meanwhile restart nothing until the reading ends, then one restart serves
    the write (the reference holds the written path as unknown: nothing is lost)."""
    sim: Simulation = make_sim(build_s=3.0)  # type: ignore[operator]
    assert serving_epoch(sim) == 0 and _building(sim)
    written = sim.write(good=True)
    sim.send(signal.SIGHUP)
    sim.advance(1.0)  # 2 s into the reading
    assert serving_epoch(sim) == 0 and len(sim.world.spawned) == 1, (
        "started before the reading ended"
    )
    sim.advance(5.0)
    assert not _building(sim)
    assert serving_epoch(sim) == 1
    serving = sim.world.model.serving()
    assert serving is not None and serving.content == written


def _building(sim: Simulation) -> bool:
    return sim.content.building
