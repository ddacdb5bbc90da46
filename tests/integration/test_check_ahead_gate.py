"""The gate's validation started ahead of a burst (`gate.CommandGate.check_ahead`,
issue 16): `begin` takes it only when it would run exactly that command, kills it
otherwise, and nothing started ahead outlives the gate.

Real reactor, real children, real SIGCHLD. A fake `envoy` logs each validation it
starts (its PID and config) and takes 0.3 s; a config that holds "slow" takes a
minute, so a run that was not killed is plain to see.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from envoy_autoreload.envoy_binary import binary_identity
from envoy_autoreload.gate import CommandGate
from envoy_autoreload.loop import DeadlineReached, FdReady, Reactor, SignalReceived
from envoy_autoreload.settings import Settings
from envoy_autoreload.validation import BinaryInfo, PreflightOutcome, Verdict
from tests.helpers import exited, pid_alive, wait_until, write_executable

DEADLINE = "command-deadline"
FAKE_ENVOY = """\
#!/bin/sh
case "$1" in
  --version) echo 'envoy  version: 0/1.40.0/Clean/RELEASE/BoringSSL' ;;
  --hot-restart-version) printf 11.104 >&2 ;;
  --mode)
    echo "$$ $4" >> {calls}
    if grep -q slow "$4"; then sleep 60; fi
    sleep 0.3
    grep -q bad "$4" && {{ echo "error initializing configuration '$4': bad" >&2; exit 1; }}
    echo "configuration '$4' OK" ;;
esac
"""


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    with Reactor() as loop:
        yield loop


@pytest.fixture
def envoy(tmp_path: Path) -> Path:
    return write_executable(tmp_path / "envoy", FAKE_ENVOY.format(calls=tmp_path / "calls"))


@pytest.fixture
def gate(tmp_path: Path, reactor: Reactor, envoy: Path) -> Iterator[CommandGate]:
    settings = Settings(start_script=tmp_path / "start.sh", envoy=envoy)
    made = CommandGate(settings, reactor, DEADLINE)
    yield made
    made.abandon()


def known(envoy: Path) -> BinaryInfo:
    identity = binary_identity(envoy)
    assert identity is not None
    return BinaryInfo(envoy, identity, "0/1.40.0/Clean/RELEASE/BoringSSL", "11.104")


def config(tmp_path: Path, name: str, text: str = "static_resources: {}") -> Path:
    path = tmp_path / name
    path.write_text(f"# {name}\n{text}\n")
    return path


def calls(envoy: Path) -> list[tuple[int, str]]:
    log = envoy.parent / "calls"
    lines = log.read_text().splitlines() if log.exists() else []
    return [(int(pid), path) for pid, _, path in (line.partition(" ") for line in lines)]


def pump(reactor: Reactor, gate: CommandGate) -> list[PreflightOutcome]:
    """One turn of the loop, as the supervisor's for the gate (at most 50 ms long)."""
    reactor.set_timeout("tick", 0.05)
    outcomes: list[PreflightOutcome] = []
    for event in reactor.poll():
        match event:
            case SignalReceived(signum=signal.SIGCHLD):
                outcome = gate.poll()
                if outcome is not None:
                    outcomes.append(outcome)
            case FdReady(key=key) if gate.owns(key):
                gate.on_output(key)
            case DeadlineReached(key=key) if key == DEADLINE and reactor.claim(event):
                gate.on_deadline()
            case _:
                pass
    reactor.cancel("tick")
    return outcomes


def until_verdict(
    reactor: Reactor, gate: CommandGate, first: PreflightOutcome | None
) -> PreflightOutcome:
    outcomes = [first] if first is not None else []

    def turn() -> bool | None:
        outcomes.extend(pump(reactor, gate))
        return True if outcomes else None

    if not outcomes:
        wait_until(turn, timeout_s=60, what="the verdict")
    return outcomes[0]


def reaped(reactor: Reactor, gate: CommandGate) -> Callable[[], bool]:
    def check() -> bool:
        pump(reactor, gate)
        return not gate.child_pids()

    return check


def test_the_same_check_is_taken_and_its_time_counts_from_its_start(
    tmp_path: Path, reactor: Reactor, gate: CommandGate, envoy: Path
) -> None:
    snapshot = config(tmp_path, "a.yaml")
    assert gate.check_ahead(known(envoy), snapshot)
    assert gate.ahead and not gate.busy, "ahead is not busy: nothing waits for it yet"
    started = time.monotonic()
    wait_until(lambda: len(calls(envoy)) == 1, timeout_s=30, what="the validation ahead")
    outcome = until_verdict(reactor, gate, gate.begin(known(envoy), snapshot))
    assert outcome.verdict is Verdict.PASSED, outcome
    assert len(calls(envoy)) == 1, "validated twice"
    assert outcome.duration_s >= 0.3 - 0.05, "its duration counts from when it started ahead"
    assert time.monotonic() - started < 30
    assert (gate.ahead, gate.busy, gate.child_pids()) == (False, False, set())


def test_a_check_done_before_begin_is_the_verdict_at_once(
    tmp_path: Path, reactor: Reactor, gate: CommandGate, envoy: Path
) -> None:
    """Its exit came before anyone asked: `begin` itself hands out the verdict (no
    SIGCHLD will come for it again), a failure as much as a pass."""
    snapshot = config(tmp_path, "bad.yaml", "bad: true")
    assert gate.check_ahead(known(envoy), snapshot)
    wait_until(lambda: len(calls(envoy)) == 1, timeout_s=30, what="the validation ahead")
    pid = calls(envoy)[0][0]
    wait_until(lambda: exited(pid), timeout_s=30, what="the validation to end")
    pump(reactor, gate)  # its SIGCHLD, as the loop would have handled it
    ended_at = time.monotonic()
    wait_until(lambda: time.monotonic() - ended_at >= 1.0, timeout_s=5, what="a second on")
    outcome = gate.begin(known(envoy), snapshot)
    assert outcome is not None, "the verdict was already there"
    assert outcome.verdict is Verdict.FAILED and "bad" in outcome.message, outcome
    assert 0.25 <= outcome.duration_s < 0.9, "its duration is its own, not the wait after"
    assert len(calls(envoy)) == 1
    assert not gate.busy and gate.child_pids() == set()


def test_another_config_is_validated_afresh_and_the_one_ahead_killed(
    tmp_path: Path, reactor: Reactor, gate: CommandGate, envoy: Path
) -> None:
    stale = config(tmp_path, "slow.yaml", "slow: true")
    assert gate.check_ahead(known(envoy), stale)
    wait_until(lambda: len(calls(envoy)) == 1, timeout_s=30, what="the validation ahead")
    stale_pid = calls(envoy)[0][0]
    fresh = config(tmp_path, "b.yaml")
    outcome = until_verdict(reactor, gate, gate.begin(known(envoy), fresh))
    assert outcome.verdict is Verdict.PASSED, outcome
    assert [path for _, path in calls(envoy)] == [str(stale), str(fresh)]
    assert exited(stale_pid), "the validation of the other config still runs"
    wait_until(reaped(reactor, gate), timeout_s=30, what="the killed validation reaped")


def test_other_flags_are_another_check(
    tmp_path: Path, reactor: Reactor, gate: CommandGate, envoy: Path
) -> None:
    snapshot = config(tmp_path, "a.yaml")
    assert gate.check_ahead(known(envoy), snapshot, ["--service-cluster", "x"])
    wait_until(lambda: len(calls(envoy)) == 1, timeout_s=30, what="the validation ahead")
    outcome = until_verdict(reactor, gate, gate.begin(known(envoy), snapshot))
    assert outcome.verdict is Verdict.PASSED, outcome
    assert len(calls(envoy)) == 2, "the check with other flags was taken"


def test_a_changed_binary_starts_nothing_ahead(
    tmp_path: Path, gate: CommandGate, envoy: Path
) -> None:
    """A binary that changed is checked (`--version` first) the usual way."""
    outdated = known(envoy)
    envoy.write_text(envoy.read_text() + "\n# upgraded\n")
    assert not gate.check_ahead(outdated, config(tmp_path, "a.yaml"))
    assert not gate.check_ahead(None, config(tmp_path, "a.yaml"))
    assert not gate.ahead and gate.child_pids() == set()


def test_dropped_and_abandoned_checks_are_killed_and_reaped(
    tmp_path: Path, reactor: Reactor, gate: CommandGate, envoy: Path
) -> None:
    assert gate.check_ahead(known(envoy), config(tmp_path, "slow.yaml", "slow: true"))
    wait_until(lambda: len(calls(envoy)) == 1, timeout_s=30, what="the validation ahead")
    first = calls(envoy)[0][0]
    gate.drop_ahead()
    assert not gate.ahead
    wait_until(lambda: exited(first), timeout_s=5, what="the dropped check killed")
    wait_until(reaped(reactor, gate), timeout_s=30, what="the dropped check reaped")

    assert gate.check_ahead(known(envoy), config(tmp_path, "slow2.yaml", "slow: true"))
    wait_until(lambda: len(calls(envoy)) == 2, timeout_s=30, what="the second one")
    second = calls(envoy)[1][0]
    gate.abandon()
    assert not pid_alive(second), "abandon left a check ahead running"
    assert gate.child_pids() == set()


def test_a_check_ahead_that_hangs_times_out_at_its_deadline(
    tmp_path: Path, reactor: Reactor, envoy: Path
) -> None:
    settings = Settings(start_script=tmp_path / "start.sh", envoy=envoy, validate_timeout_s=0.5)
    gate = CommandGate(settings, reactor, DEADLINE)
    try:
        snapshot = config(tmp_path, "slow.yaml", "slow: true")
        assert gate.check_ahead(known(envoy), snapshot)
        outcome = until_verdict(reactor, gate, gate.begin(known(envoy), snapshot))
        assert outcome.verdict is Verdict.FAILED and "timed out" in outcome.message, outcome
        assert len(calls(envoy)) == 1
    finally:
        gate.abandon()
