"""Evidence that the invariants of DESIGN-core §3 bite, kept as regression examples.

For each invariant a realistic one-line defect was planted in the core (on 4fa377b) and
the stateful simulation (`test_stateful.py`) was run until it failed through that
invariant. The shortest failing sequence Hypothesis printed is replayed here on the
rules of `DaemonInAWorld`, with the same initialize arguments; steps that changed
nothing, which the shrinker had left in, were taken out by hand. The correct core passes
every sequence; each test fails on its defect, through the invariant in its name, so
the defect cannot come back unnoticed. Each docstring quotes the defect
(`module: before -> after`) and how many generated runs it took to find it (counted
up to the first failure, with `--hypothesis-seed` 0, 1 and 2).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.simulation.model import ProcState
from tests.simulation.test_stateful import DaemonInAWorld


@pytest.fixture
def state() -> Iterator[DaemonInAWorld]:
    machine = DaemonInAWorld()
    yield machine
    if machine.sim is not None:
        machine.sim.close()  # teardown() closes it too when it gets there; twice is harmless


def test_invariant_1_the_orphan_kill_spares_what_serves_by_then(state: DaemonInAWorld) -> None:
    """recovery.py `kill_orphans`: `if gen.marks.stop_reason is not None and gen.state is
    not GenerationState.STARTING:` -> `if gen.state is not GenerationState.STARTING:`
    (the --term-wait KILL of orphans forgets to look at the mark).

    Epoch 1 dies while epoch 0 drains; its respawn dies too, so epoch 0, now an orphan,
    is TERMed and the orphan deadline is armed. A new epoch 0 serves long before that
    deadline, and the defect KILLs it there (t=30.3).

    Found after 5,213, 16,233 and 9,971 generated runs (seeds 0, 1, 2); Hypothesis's
    shortest had six steps, this four-step one was built by hand.
    """
    state.start(
        max_drain_wait_s=0.0,
        start_timeout_s=5.0,
        parent_shutdown_s=1.0,
        debounce_s=0.05,
        watch=False,
        on_incompatible_binary="refuse",
    )
    state.signal_daemon(count=1, signum=signal.SIGHUP)
    state.wait(seconds=0.3)
    state.kill(signum=signal.SIGKILL, state=ProcState.LIVE)
    state.kill(signum=signal.SIGKILL, state=ProcState.INITIALIZING)
    state.safe()
    state.teardown()


def test_invariant_2_a_hung_drain_with_a_live_successor_is_not_killed(
    state: DaemonInAWorld,
) -> None:
    """recovery.py `stop_hung_drains`: `if gen.epoch + 1 in alive_epochs or
    gen.marks.stop_reason is not None:` -> `if gen.marks.stop_reason is not None:` (a hung
    drain is KILLed although its successor lives).

    Epochs 0 and 1 hang in their drains (§7) while epoch 2 serves: three alive, so the
    next epoch has to wait. Epoch 0 is long past its parent-shutdown time, but its
    successor, epoch 1, lives: KILLing it would make epoch 1 abort (§6).

    Found after 2,913, 12,801 and 4,961 generated runs (seeds 0, 1, 2).
    """
    state.start(
        max_drain_wait_s=0.0,
        start_timeout_s=5.0,
        parent_shutdown_s=1.0,
        debounce_s=0.05,
        watch=True,
        on_incompatible_binary="refuse",
    )
    state.write(good=True)
    state.wait(seconds=0.3)
    state.control_reload(force=True)
    state.wedge(state=ProcState.DRAINING)
    state.wedge(state=ProcState.LIVE)
    state.wait(seconds=11.0)
    state.control_reload(force=True)
    state.wait(seconds=0.04)
    state.safe()
    state.teardown()


def test_invariant_3_no_fourth_process_while_a_drain_hangs(state: DaemonInAWorld) -> None:
    """supervisor.py `_socket_taken`: `return held or len(alive) >= MAX_FAMILY_PROCESSES`
    -> `return len(alive) > MAX_FAMILY_PROCESSES` (four processes count as fine, and the
    domain-socket slot is not looked at).

    Epoch 0 hangs in its drain (§7); epochs 1 and 2 follow, and a third restart would be
    a fourth process, on epoch 0's domain socket (§0, §4).

    Found after 11,233 and 9,529 generated runs (seeds 0, 1); seed 2 had not found it
    in 30,000.
    """
    state.start(
        max_drain_wait_s=0.0,
        start_timeout_s=5.0,
        parent_shutdown_s=1.0,
        debounce_s=0.05,
        watch=False,
        on_incompatible_binary="refuse",
    )
    state.signal_daemon(count=1, signum=signal.SIGHUP)
    state.wait(seconds=0.3)
    state.wedge(state=ProcState.DRAINING)
    state.signal_daemon(count=1, signum=signal.SIGHUP)
    state.wait(seconds=0.1)
    state.signal_daemon(count=1, signum=signal.SIGHUP)
    state.wait(seconds=0.04)
    state.safe()
    state.teardown()


def test_invariant_4_a_retry_reuses_the_failed_epoch(state: DaemonInAWorld) -> None:
    """launcher call in supervisor.py `_start_next`: `serving.epoch + 1,` ->
    `serving.epoch + 1 + self._planner.hot_failures,` (a failed epoch is not reused).

    The reload is validated with the old binary; the binary swapped under it has another
    hot-restart version, so epoch 1 aborts (ENVOY_FACTS §14) and its retry must be epoch
    1 again, not 2 (§4: epochs are consecutive).

    Found after 246, 685 and 101 generated runs (seeds 0, 1, 2).
    """
    state.start(
        max_drain_wait_s=0.0,
        start_timeout_s=5.0,
        parent_shutdown_s=1.0,
        debounce_s=0.05,
        watch=False,
        on_incompatible_binary="refuse",
    )
    state.wait(seconds=0.1)
    state.control_reload(force=False)
    state.swap_binary(hot_restart_version="12.0", ok=False)
    state.wait(seconds=2.9)
    state.safe()
    state.teardown()


def test_invariant_5_content_that_changed_after_validation_is_not_started(
    state: DaemonInAWorld,
) -> None:
    """supervisor.py `_advance`: `if self._reactor.has_deadline(Timer.RETRY) or
    self._intake.changed_since_validated(plan):` -> `if self._reactor.has_deadline(
    Timer.RETRY):` (the plan starts without checking the content changed since it was
    validated).

    The config is deleted right after a forced reload validated it: the start would run
    Envoy on a missing file that never passed the gate.

    Found after 639, 293 and 2,506 generated runs (seeds 0, 1, 2).
    """
    state.start(
        max_drain_wait_s=0.0,
        start_timeout_s=5.0,
        parent_shutdown_s=1.0,
        debounce_s=0.05,
        watch=True,
        on_incompatible_binary="refuse",
    )
    state.wait(seconds=0.1)
    state.control_reload(force=True)
    state.delete_config()
    state.wait(seconds=0.04)
    state.safe()
    state.teardown()


def test_invariant_5_a_refused_binary_is_no_pass(state: DaemonInAWorld) -> None:
    """validation.py `PreflightOutcome.ok`: `return self.verdict is Verdict.PASSED` ->
    `return self.verdict is not Verdict.FAILED` (a refused binary counts as a pass).

    The binary check refuses the new binary before the config is looked at, so the
    missing config never passed the gate; the defect starts it anyway.

    Found after 835, 265 and 1,173 generated runs (seeds 0, 1, 2).
    """
    state.start(
        max_drain_wait_s=0.0,
        start_timeout_s=5.0,
        parent_shutdown_s=1.0,
        debounce_s=0.05,
        watch=True,
        on_incompatible_binary="refuse",
    )
    state.delete_config()
    state.wait(seconds=0.1)
    state.swap_binary(hot_restart_version="11.104", ok=False)
    state.control_reload(force=False)
    state.safe()
    state.teardown()


def test_invariant_6_an_unchanged_reload_is_answered(state: DaemonInAWorld) -> None:
    """intake.py `_requests_change_nothing`: `seq=self._batches.request_seq,` ->
    `seq=self._batches.seq,` (requests that change nothing are answered only through
    the last batch, not through the newest request).

    A reload sent while epoch 0 starts is queued; once epoch 0 serves, the content is
    what it runs, so the reload is answered "unchanged", or it is lost.

    Found after 579, 1,090 and 856 generated runs (seeds 0, 1, 2).
    """
    state.start(
        max_drain_wait_s=0.0,
        start_timeout_s=5.0,
        parent_shutdown_s=1.0,
        debounce_s=0.05,
        watch=True,
        on_incompatible_binary="refuse",
    )
    state.control_reload(force=False)
    state.wait(seconds=0.1)
    state.safe()
    state.teardown()


def test_invariant_6_a_reload_whose_validation_the_outage_abandoned_is_kept(
    state: DaemonInAWorld,
) -> None:
    """exits.py `_requeue_pending`: `self._batches.requeue(self._gatekeeper.reason)` ->
    `pass` (the request being validated when the serving epoch dies is dropped with its
    validation).

    The serving Envoy dies while a reload is being validated: the validation is
    abandoned, and the reload must go back in the queue, to pass the gate and be
    answered once something serves again.

    Found after 142, 1,159 and 1,401 generated runs (seeds 0, 1, 2).
    """
    state.start(
        max_drain_wait_s=0.0,
        start_timeout_s=5.0,
        parent_shutdown_s=1.0,
        debounce_s=0.05,
        watch=False,
        on_incompatible_binary="refuse",
    )
    state.wait(seconds=0.1)
    state.control_reload(force=False)
    state.kill(signum=signal.SIGKILL, state=ProcState.LIVE)
    state.wait(seconds=0.1)
    state.safe()
    state.teardown()


def test_invariant_7_the_flag_a_failed_start_left_is_cleared(state: DaemonInAWorld) -> None:
    """launcher.py `spawn`: `self._family.restore_flag(parent, epoch)` -> `pass` (the
    hot-restart flag a failed child left set is never cleared).

    Epoch 1 fails on a port held elsewhere and leaves SHMEM_FLAGS_INITIALIZING set
    (ENVOY_FACTS §3); every later hot restart is then refused, so the new content never
    serves, even after the fault stops.

    Found after 246, 7,370 and 2,276 generated runs (seeds 0, 1, 2).
    """
    state.start(
        max_drain_wait_s=0.0,
        start_timeout_s=5.0,
        parent_shutdown_s=1.0,
        debounce_s=0.05,
        watch=False,
        on_incompatible_binary="refuse",
    )
    state.port_conflict(on=True)
    state.signal_daemon(count=1, signum=signal.SIGHUP)
    state.wait(seconds=0.1)
    state.write(good=True)
    state.safe()
    state.teardown()


def test_invariant_8_a_stop_that_needed_sigkill_exits_1(state: DaemonInAWorld) -> None:
    """shutdown.py `kill_remaining`: `self._floor = ExitCode.CHILD_KILLED` -> `pass`
    (the exit code forgets that a child had to be KILLed).

    The serving epoch hangs (SIGSTOP, §7) and ignores SIGTERM, so --term-wait runs out
    and it is KILLed: the documented exit code is then 1, not 0.

    Found after 2,061, 1,069 and 548 generated runs (seeds 0, 1, 2).
    """
    state.start(
        max_drain_wait_s=0.0,
        start_timeout_s=5.0,
        parent_shutdown_s=1.0,
        debounce_s=0.05,
        watch=False,
        on_incompatible_binary="refuse",
    )
    state.admin_blind(on=True)
    state.wait(seconds=0.1)
    state.admin_blind(on=False)
    state.wedge(state=ProcState.LIVE)
    state.stop_mid_start(signum=signal.SIGTERM)
    state.wait(seconds=61.0)
    state.safe()
    state.teardown()


def test_invariant_9_requests_that_join_a_validated_plan_raise_nothing(
    state: DaemonInAWorld,
) -> None:
    """states.py `PLAN_EDGES`: `(_S, _S): frozenset({"gate_passed", "no_gate", "retry",
    "absorbed"})` -> without `"absorbed"` (a move the planner makes is missing from the
    table, so `replan` raises IllegalMove in a handler).

    A SIGHUP whose content is what a validated plan carries joins that plan
    (REVIEW-core finding 15): the move StartNext -> StartNext ("absorbed").

    Found after 246, 185 and 101 generated runs (seeds 0, 1, 2).
    """
    state.start(
        max_drain_wait_s=0.0,
        start_timeout_s=5.0,
        parent_shutdown_s=1.0,
        debounce_s=0.05,
        watch=True,
        on_incompatible_binary="refuse",
    )
    state.wait(seconds=0.1)
    state.signal_daemon(count=1, signum=signal.SIGHUP)
    state.safe()
    state.teardown()


def test_invariant_7_a_failure_stands_when_a_restart_of_the_same_bytes_is_superseded(
    state: DaemonInAWorld,
) -> None:
    """Found by the stateful simulation itself (2026-12-02, not planted): probation.py
    recorded PROBATION, then SUPERSEDED, for a generation whose bytes had failed
    probation while it was starting, over their FAILED.

    An unhealthy v1 starts as epoch 1; a SIGHUP (the convergence step's) restarts the
    same v1 as epoch 2 while epoch 1 is on probation. Epoch 1 fails, the rollback to v0
    supersedes epoch 2, and v1 read as merely superseded: v0 served while the files
    held v1, which was not known to have failed (invariant 7 at teardown)."""
    _serving_a_good_config(state)
    state.write(good=True, healthy=False)
    state.wait(seconds=0.04)
    state.teardown()


def test_invariant_7_a_forced_reload_requested_before_the_failure_does_not_undo_it(
    state: DaemonInAWorld,
) -> None:
    """Found by the stateful simulation (2026-12-02) right after the fix above, which
    let any `--force` reload record over a failure: a forced reload of v2, asked for
    while v2 was still on its way in, ran after v2 failed and was superseded by the
    rollback; only a start made once the bytes had failed is a retry on purpose."""
    _serving_a_good_config(state)
    state.write(good=False, healthy=True)
    state.write(good=True, healthy=False)
    state.wait(seconds=0.04)
    state.control_reload(force=True)
    state.teardown()


def _serving_a_good_config(state: DaemonInAWorld) -> None:
    """Watching, with a 10 s health window passed: epoch 0's config is the last good."""
    state.start(
        max_drain_wait_s=2.0,
        start_timeout_s=5.0,
        parent_shutdown_s=1.0,
        debounce_s=0.05,
        watch=True,
        on_incompatible_binary="refuse",
        build_s=0.0,
    )
    state.wait(seconds=11.0)


def test_invariant_7_a_rollback_does_not_replace_a_newer_push_that_went_live_first(
    state: DaemonInAWorld,
) -> None:
    """Found by the stateful simulation in CI (2026-12-02, not planted; it predates
    check ahead): rollbacks.py started the rollback from a failed config even after a
    newer push, starting when that config failed, had gone LIVE.

    An unhealthy v2 serves as epoch 1; the files go back to v1 and a SIGHUP starts v1
    as epoch 2. Epoch 1 fails probation while epoch 2 starts; epoch 2 goes LIVE, and
    then the rollback to v0 replaced it: v0 served while the files held the healthy,
    validated v1 (invariant 7 at teardown)."""
    _serving_a_good_config(state)
    state.write(good=True, healthy=True)
    state.write(good=True, healthy=False)
    state.wait(seconds=0.1)
    state.revert(back=1)
    state.teardown()


def test_a_rollback_left_without_a_plan_is_carried_out_later(state: DaemonInAWorld) -> None:
    """helper-30 (2026-12-02, not planted; it predates this round): an unhealthy v1 on
    probation, a newer v2 that cannot start (a port conflict). v1 fails; its rollback
    gets no plan, since v2's holds the next start, and v2's retries run out. The
    failed v1 then served for good, even once the port was free."""
    _serving_a_good_config(state)
    failed = state.s.write(good=True, healthy=False)
    state.wait(seconds=0.35)
    state.port_conflict(on=True)
    state.s.write(good=True, healthy=True)
    state.wait(seconds=130.0)
    state.port_conflict(on=False)
    state.wait(seconds=130.0)
    serving = state.s.world.model.serving()
    assert serving is not None and serving.content != failed, "the failed config serves"


def test_a_rollback_finished_by_a_revert_is_not_started_again(state: DaemonInAWorld) -> None:
    """helper-30: the files go back to v0 while v1 is on probation; v1 fails while the
    revert's epoch starts, and that epoch going LIVE finishes the rollback. Its plan
    was kept, and v0 was started a second time."""
    _serving_a_good_config(state)
    state.write(good=True, healthy=False)
    state.wait(seconds=0.3)
    state.revert(back=1)
    state.wait(seconds=6.0)
    assert [s.epoch for s in state.s.world.spawned] == [0, 1, 2]


def test_invariant_5_a_named_file_broken_during_a_full_restart_is_not_called_validated(
    state: DaemonInAWorld,
) -> None:
    """Found by the stateful simulation on 3bd7494 (2026-12-03, not planted). A binary
    that cannot hot restart passes the gate, so the family is stopped for epoch 0 on
    it, with the validated config snapshot. A file the config names breaks meanwhile:
    with generations on, epoch 0 started it under the validated request's name, as if
    the gate had passed it, where generations off call such a start what it is."""
    state.start(
        max_drain_wait_s=0.0,
        start_timeout_s=5.0,
        parent_shutdown_s=1.0,
        debounce_s=0.05,
        watch=True,
        on_incompatible_binary="restart",
        build_s=0.0,
    )
    state.wait(seconds=0.1)
    state.swap_binary(hot_restart_version="12.0", ok=True)
    state.signal_daemon(count=1, signum=signal.SIGHUP)
    state.write_named(ok=False)
    state.wait(seconds=0.04)
    state.safe()
    state.teardown()
