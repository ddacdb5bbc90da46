"""Configs are parsed off the event loop (issue 16): in a child the gate runs, while
Envoy validates. A passing verdict waits for its config's facts, a failing one for
nothing; the family's LIVE probe waits for a generation's admin address instead of
parsing its config on the loop. Real reactor, real children, real signals; PyYAML is
made to fail in this process, so a parse here would show."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest
import yaml

from envoy_autoreload import envoy_config
from envoy_autoreload.addresses import AdminAddress
from envoy_autoreload.bootstrap_facts import INLINE_MAX_BYTES, BootstrapReader
from envoy_autoreload.envoy_binary import BinaryInfo, binary_identity
from envoy_autoreload.family import EnvoyFamily
from envoy_autoreload.gate import CommandGate
from envoy_autoreload.loop import DeadlineReached, FdReady, Reactor, SignalReceived
from envoy_autoreload.plain_yaml import load_plain
from envoy_autoreload.settings import Settings
from envoy_autoreload.validation import PreflightOutcome, Verdict
from tests.helpers import wait_until

if TYPE_CHECKING:
    from envoy_autoreload.roster import Generation

ROUTES = 6_000  # ~1 MB: PyYAML takes a good half second, a blink for the loop's child
DEADLINE = "command-deadline"
HEADER = """\
admin:
  address:
    socket_address: { address: 127.0.0.1, port_value: 19901 }
static_resources:
  listeners:
    - name: main
      filter_chains:
        - filters:
            - name: hcm
              typed_config:
                access_log:
                  - typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.\
FileAccessLog
                      path: /var/log/envoy/access.log
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
"""
ROUTE = """\
                        - match: {{ path: "/service-{i:05d}" }}
                          direct_response: {{ status: 200, body: {{ inline_string: "{i}" }} }}
"""


def big_config(path: Path) -> Path:
    path.write_text(HEADER + "".join(ROUTE.format(i=i) for i in range(ROUTES)))
    return path


def fake_envoy(tmp_path: Path, validate_rc: int) -> Path:
    """Answers as Envoy 1.40 and validates in 0.1 s, with `validate_rc`: never so fast
    that the verdict is in before `begin` returns (a loaded 2-core box ran all three
    commands to their end within `begin` once)."""
    envoy = tmp_path / "envoy"
    envoy.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        "  --version) echo 'envoy  version: 0/1.40.0/Clean/RELEASE/BoringSSL' ;;\n"
        "  --hot-restart-version) printf 11.104 >&2 ;;\n"
        f"  --mode) sleep 0.1; [ {validate_rc} = 0 ] || echo 'error initializing configuration' >&2"
        f"; exit {validate_rc} ;;\n"
        "esac\n"
    )
    envoy.chmod(0o755)
    return envoy


@pytest.fixture
def no_parse_here(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A parse of a big config in this process (the daemon's loop, in these tests)
    fails the test; the sizes of those it parsed (small ones) are listed."""
    load = yaml.load
    parsed: list[int] = []

    def refuse(stream: bytes, Loader: type[yaml.CSafeLoader]) -> object:
        if len(stream) > INLINE_MAX_BYTES:
            raise AssertionError("a big bootstrap was parsed in the daemon's process")
        parsed.append(len(stream))
        return load(stream, Loader=Loader)

    def refuse_plain(data: bytes) -> object:
        if len(data) > INLINE_MAX_BYTES:
            raise AssertionError("a big bootstrap was parsed in the daemon's process")
        parsed.append(len(data))
        return load_plain(data)

    monkeypatch.setattr(yaml, "load", refuse)
    monkeypatch.setattr(envoy_config, "load_plain", refuse_plain)
    return parsed


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    with Reactor() as loop:
        yield loop


@pytest.fixture
def gates() -> Iterator[list[CommandGate]]:
    """Every gate a test makes is abandoned at its end: no parse outlives the test."""
    made: list[CommandGate] = []
    yield made
    for gate in made:
        gate.abandon()


@dataclass
class Loop:
    """What the supervisor does for the gate: SIGCHLD to `poll()`, pipes to
    `on_output()`, its deadline to `on_deadline()`; and the longest turn."""

    reactor: Reactor
    gate: CommandGate
    longest_turn_s: float = 0.0

    def turn(self) -> PreflightOutcome | None:
        events = self.reactor.poll()
        began = self.reactor.now()
        outcome = None
        for event in events:
            match event:
                case SignalReceived(signum=signal.SIGCHLD):
                    outcome = self.gate.poll() or outcome
                case FdReady(key=key) if self.gate.owns(key):
                    self.gate.on_output(key)
                case DeadlineReached() if self.reactor.claim(event):
                    self.gate.on_deadline()
                case _:
                    pass
        self.longest_turn_s = max(self.longest_turn_s, self.reactor.now() - began)
        return outcome

    def until(self, done: Callable[[], bool], what: str) -> None:
        def step() -> bool | None:
            self.turn()
            return True if done() else None

        wait_until(step, timeout_s=60, what=what)


def gate_for(
    tmp_path: Path, reactor: Reactor, config: Path, validate_rc: int, made: list[CommandGate]
) -> CommandGate:
    settings = Settings(
        start_script=tmp_path / "start.sh", config=config, envoy=fake_envoy(tmp_path, validate_rc)
    )
    made.append(CommandGate(settings, reactor, DEADLINE))
    return made[-1]


@pytest.mark.usefixtures("no_parse_here")
def test_a_passing_verdict_comes_with_its_configs_facts_parsed_in_a_child(
    tmp_path: Path, reactor: Reactor, gates: list[CommandGate]
) -> None:
    config = big_config(tmp_path / "envoy.yaml")
    gate = gate_for(tmp_path, reactor, config, 0, gates)
    loop = Loop(reactor, gate)
    assert gate.begin(None, None) is None
    outcomes: list[PreflightOutcome] = []
    parses_seen: set[int] = set()

    def done() -> bool:
        parses_seen.update(gate.bootstrap.child_pids())
        return bool(outcomes)

    def step() -> bool | None:
        outcome = loop.turn()
        if outcome is not None:
            # Handed out only once the facts are in, never before.
            assert not gate.bootstrap.pending(config)
            outcomes.append(outcome)
        return True if done() else None

    wait_until(step, timeout_s=60, what="the verdict")
    assert outcomes[0].verdict is Verdict.PASSED
    assert not gate.busy and gate.child_pids() == set()
    assert parses_seen, "the config was parsed by a child of the gate"
    facts = gate.bootstrap_facts(None)
    assert facts is not None and facts.admin == AdminAddress("127.0.0.1", 19901)
    assert facts.references is not None
    assert [p for p, _ in facts.references.excluded] == [Path("/var/log/envoy/access.log")]
    assert loop.longest_turn_s < 0.5, "handling the verdict and the facts is quick"


@pytest.mark.usefixtures("no_parse_here")
def test_a_failing_verdict_waits_for_no_parse(
    tmp_path: Path, reactor: Reactor, gates: list[CommandGate]
) -> None:
    config = big_config(tmp_path / "envoy.yaml")
    gate = gate_for(tmp_path, reactor, config, 1, gates)
    loop = Loop(reactor, gate)
    assert gate.begin(None, config) is None
    found: list[tuple[PreflightOutcome, bool]] = []

    def step() -> bool | None:
        outcome = loop.turn()
        if outcome is not None:
            found.append((outcome, gate.bootstrap.pending(config)))
        return True if found else None

    wait_until(step, timeout_s=60, what="the failed verdict")
    outcome, still_parsing = found[0]
    assert outcome.verdict is Verdict.FAILED
    assert still_parsing, "the verdict came while the (half-second) parse still ran"
    gate.abandon()  # shutdown: the parse still running is killed and reaped
    assert gate.child_pids() == set()


@dataclass(frozen=True)
class FakeGen:
    """What the family reads of a generation started by a script that has not exec'd
    Envoy in /proc yet, with no snapshot: its config is --config."""

    epoch: int = 0
    envoy: None = None
    config: None = None


@pytest.mark.usefixtures("no_parse_here")
def test_live_waits_for_the_admin_address_instead_of_parsing_on_the_loop(
    tmp_path: Path, reactor: Reactor, gates: list[CommandGate]
) -> None:
    config = big_config(tmp_path / "envoy.yaml")
    gate = gate_for(tmp_path, reactor, config, 0, gates)
    family = EnvoyFamily(Settings(start_script=tmp_path / "start.sh", config=config))
    family.bootstrap = gate.bootstrap
    gen = cast("Generation", FakeGen())
    assert family.admin_address(gen) is None
    assert family.admin_pending(gen), "asked for, off the loop"
    assert not family.is_live(gen), "not LIVE while its admin address is unknown"
    loop = Loop(reactor, gate)
    loop.until(lambda: not family.admin_pending(gen), "the admin address")
    assert family.admin_address(gen) == AdminAddress("127.0.0.1", 19901)


def test_a_snapshot_is_parsed_once(
    tmp_path: Path, reactor: Reactor, gates: list[CommandGate], no_parse_here: list[int]
) -> None:
    config = big_config(tmp_path / "envoy.yaml")
    gate = gate_for(tmp_path, reactor, config, 0, gates)
    reader = gate.bootstrap
    reader.request(config)
    assert reader.pending(config)
    Loop(reactor, gate).until(lambda: not reader.pending(config), "the facts")
    assert reader.lookup(config) is not None
    reader.request(config)
    assert not reader.pending(config), "known: not parsed again"
    config.write_text(HEADER)  # the file changed (and is small now): read again, here
    assert reader.lookup(config) is None
    reader.request(config)
    facts = reader.lookup(config)
    assert facts is not None and facts.admin == AdminAddress("127.0.0.1", 19901)
    assert no_parse_here == [len(HEADER)] and reader.child_pids() == set()


def test_a_small_config_is_read_at_once_and_its_verdict_waits_for_nothing(
    tmp_path: Path, reactor: Reactor, gates: list[CommandGate], no_parse_here: list[int]
) -> None:
    """Most configs are a few KiB: parsing one costs the loop less than a child's start
    would, and a restart need not wait for a Python to start (bench/latency.py)."""
    config = tmp_path / "envoy.yaml"
    config.write_text(HEADER)
    gate = gate_for(tmp_path, reactor, config, 0, gates)
    assert gate.begin(None, None) is None  # the binary checks and validation still run
    assert gate.bootstrap_facts(None) is not None, "known as the preflight began"
    assert gate.child_pids() and not gate.bootstrap.child_pids(), "no parse child"
    found: list[PreflightOutcome] = []

    def step() -> bool | None:
        outcome = Loop(reactor, gate).turn()
        if outcome is not None:
            found.append(outcome)
        return True if found else None

    wait_until(step, timeout_s=60, what="the verdict")
    assert found[0].verdict is Verdict.PASSED
    assert no_parse_here == [len(HEADER)]


def test_a_parse_that_hangs_is_killed_at_its_deadline(
    tmp_path: Path, reactor: Reactor, gates: list[CommandGate]
) -> None:
    fifo = tmp_path / "envoy.yaml"
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: never
    gate = gate_for(tmp_path, reactor, fifo, 0, gates)
    gate.bootstrap = BootstrapReader(reactor, gate._arm_deadline, timeout_s=0.5)
    gate.bootstrap.request(fifo)
    assert reactor.has_deadline(DEADLINE), "armed though the gate itself is idle"
    Loop(reactor, gate).until(lambda: not gate.bootstrap.pending(fifo), "the parse killed")
    facts = gate.bootstrap.lookup(fifo)
    assert facts is not None and facts.admin is None and facts.references is None
    assert facts.error == f"cannot parse Envoy config {fifo}: gave up after 0.5 s"
    assert not reactor.has_deadline(DEADLINE)


@pytest.mark.parametrize("validate_rc", [0, 1])
def test_a_verdict_is_ready_only_once_the_run_ahead_on_exactly_it_passed(
    tmp_path: Path, reactor: Reactor, gates: list[CommandGate], validate_rc: int
) -> None:
    """`verdict_ready` (ready_start.py): `begin` with the same arguments would pass at
    once. Not while the run ahead still runs, not for other bytes, not when it failed;
    and asking changes nothing: `begin` then takes that very run."""
    config = tmp_path / "envoy.yaml"
    config.write_text(HEADER)
    other = tmp_path / "other.yaml"
    other.write_text(HEADER)
    gate = gate_for(tmp_path, reactor, config, validate_rc, gates)
    envoy = tmp_path / "envoy"
    identity = binary_identity(envoy)
    assert identity is not None
    binary = BinaryInfo(envoy, identity, "0/1.40.0/Clean/RELEASE/BoringSSL", "11.104")  # known
    assert gate.read_facts_now(config) is not None  # as `Gatekeeper.check_ahead` does
    assert not gate.verdict_ready(binary, config), "nothing ran ahead"
    assert gate.check_ahead(binary, config)
    (validation,) = gate.child_pids()
    assert not gate.verdict_ready(binary, config), "the run ahead is still running"
    wait_until(lambda: _ended(validation), timeout_s=30, what="the validation's exit")
    assert gate.verdict_ready(binary, config) is (validate_rc == 0)
    assert not gate.verdict_ready(binary, other), "a run about other bytes"
    assert not gate.verdict_ready(None, config), "a binary to check first"
    outcome = gate.begin(binary, config)
    assert outcome is not None and outcome.ok is (validate_rc == 0), "taken at once"


def _ended(pid: int) -> bool:
    """Exited (a zombie until reaped, as `verdict_ready`'s poll does) or gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.usefixtures("no_parse_here")
def test_before_the_loop_a_big_configs_facts_come_from_the_checks_child(
    tmp_path: Path, reactor: Reactor, gates: list[CommandGate]
) -> None:
    """Start-up: `check_now` starts the parse beside the validation, and the facts the
    watch needs before the loop runs are that child's, waited for, not a parse here."""
    config = big_config(tmp_path / "envoy.yaml")
    gate = gate_for(tmp_path, reactor, config, 0, gates)
    gate.check_now(None)  # its verdict (this fake prints no "OK") is not the point
    assert gate.bootstrap.pending(config), "the parse runs beside the check"
    facts = gate.facts_before_loop(config)
    assert facts.admin == AdminAddress("127.0.0.1", 19901)
    assert facts.references is not None
    assert [p for p, _ in facts.references.excluded] == [Path("/var/log/envoy/access.log")]
    assert not gate.bootstrap.pending(config) and gate.child_pids() == set()
    assert gate.facts_before_loop(config) is facts, "kept: not parsed twice"


@pytest.mark.usefixtures("no_parse_here")
def test_before_the_loop_a_config_nobody_parsed_yet_is_parsed_in_a_child(
    tmp_path: Path, reactor: Reactor, gates: list[CommandGate]
) -> None:
    """--no-validate, or a re-exec's adoption: no check started a parse; one is started
    and waited for, still not in the daemon."""
    config = big_config(tmp_path / "envoy.yaml")
    gate = gate_for(tmp_path, reactor, config, 0, gates)
    assert gate.facts_before_loop(config).admin == AdminAddress("127.0.0.1", 19901)
