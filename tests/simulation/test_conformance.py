"""Model conformance, the model's side: each scenario of `tests/conformance_scenarios.py`
run by the real core against the modelled Envoy, on a virtual clock.

`tests/envoy/test_conformance.py` runs the same scenarios on the real Envoy and asserts
the same outcome. The daemon's events are captured from its loggers as the JSON lines
the real daemon prints (`JsonFormatter`), so `Await` means the same on both sides. What
Envoy did is read from the model itself, not from the daemon: which processes went LIVE,
which one serves at the end, how many were alive at once.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, assert_never

import pytest

from envoy_autoreload.logs import JsonFormatter
from tests.conformance_scenarios import (
    SCENARIOS,
    SLOW_INIT_S,
    Await,
    AwaitInitializing,
    Freeze,
    HoldPort,
    Kill,
    Observed,
    Outcome,
    Quiet,
    ReleasePort,
    Scenario,
    Sighup,
    Step,
    Stop,
    Thaw,
    Write,
    body,
    check,
    counts,
)
from tests.simulation.harness import Knobs, Simulation
from tests.simulation.model import Content, Proc, ProcState

TICK_S = 0.005  # how far virtual time moves between two looks at an awaited condition
Event = dict[str, Any]


class _Capture(logging.Handler):
    """The daemon's events as the real one prints them with --log-format json."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.events: list[Event] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(json.loads(self.format(record)))


@contextmanager
def _captured() -> Iterator[_Capture]:
    logger = logging.getLogger("envoy_autoreload")
    capture = _Capture()
    level = logger.level
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)  # the real daemon's default --log-level
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.setLevel(level)


class ModelRun:
    """One scenario against the model; the steps' meaning mirrors the real side's."""

    def __init__(self, scenario: Scenario, capture: _Capture) -> None:
        self.scenario = scenario
        knobs = Knobs(
            parent_shutdown_s=float(scenario.parent_shutdown_s),
            start_timeout_s=scenario.start_timeout_s,
        )
        self.sim = Simulation(knobs)
        self.capture = capture
        self.port_held = False
        self.disk_binds_held_port = False
        self.serves: str | None = None
        self.step_done_at = 0.0

    def events(self, name: str, **fields: object) -> list[Event]:
        return [
            e
            for e in self.capture.events
            if e["event"] == name and all(e.get(k) == v for k, v in fields.items())
        ]

    def run(self) -> Observed:
        self.sim.begin()
        try:
            for step in self.scenario.steps:
                self.do(step)
                self.step_done_at = self.sim.now
            assert self.sim.exited, "a scenario ends with Stop()"
            return self.observed()
        finally:
            self.sim.close()

    def do(self, step: Step) -> None:
        sim = self.sim
        match step:
            case Write(version=version, binds_held_port=binds, slow=slow):
                self.disk_binds_held_port = binds
                self._port_conflict()
                sim.revert_to(Content(version, init_s=SLOW_INIT_S if slow else 0.0))
            case Sighup(count=count):
                for _ in range(count):
                    sim.send(signal.SIGHUP)
            case HoldPort():
                self.port_held = True
                self._port_conflict()
            case ReleasePort():
                self.port_held = False
                self._port_conflict()
            case Freeze():
                self.freeze()
            case Thaw():
                model = sim.world.model
                model.now = sim.now
                model.unwedge_all()
                model.unresponsive(False)
                sim.run_until_quiet()
            case Kill(role=role, signum=signum):
                self.kill(role, signum)
            case Await():
                self.await_event(step)
            case AwaitInitializing(epoch=epoch):
                self.until(
                    lambda: any(
                        p.epoch == epoch and p.state is ProcState.INITIALIZING
                        for p in sim.world.model.alive()
                    ),
                    30.0,
                    f"epoch {epoch} initializing",
                )
            case Quiet(seconds=seconds):
                started = len(sim.world.spawned)
                sim.advance(seconds)
                assert len(sim.world.spawned) == started, f"a child started within {seconds} s"
            case Stop(within_s=within_s):
                self.stop(within_s)
            case _:
                assert_never(step)

    def _port_conflict(self) -> None:
        """The model's conflict is the world's: a child fails to bind while the port is
        held and the config on disk (the one a child starts with) names it."""
        self.sim.world.model.port_conflict = self.port_held and self.disk_binds_held_port

    def reported(self, role: str) -> Proc:
        """The Envoy the daemon last reported in `role`, which the model must agree on."""
        reported = self.events(f"child.{role}")
        assert reported, f"the daemon never reported a {role} Envoy"
        proc = self.sim.world.model.by_pid(int(reported[-1]["pid"]))
        assert proc.state is (ProcState.LIVE if role == "serving" else ProcState.DRAINING), (
            f"the {role} Envoy the daemon reported is {proc.state.value} in the model"
        )
        return proc

    def kill(self, role: str, signum: signal.Signals) -> None:
        proc = self.reported(role)
        model = self.sim.world.model
        model.now = self.sim.now
        model.deliver(proc, signum)
        self.sim.run_until_quiet()

    def freeze(self) -> None:
        """SIGSTOP: the process runs nothing (`wedge`) and so answers none of its
        children (`unresponsive`, §7)."""
        model = self.sim.world.model
        model.now = self.sim.now
        model.wedge(self.reported("serving"))
        model.unresponsive(True)

    def await_event(self, step: Await) -> None:
        fields = dict(step.fields)
        self.until(
            lambda: len(self.events(step.event, **fields)) >= step.count,
            step.timeout_s,
            f"event {step.event} {fields} x{step.count}",
        )
        if step.within_s is not None:
            low, high = step.within_s
            took = self.sim.now - self.step_done_at
            assert low <= took <= high, f"{step.event} after {took:.2f} s, not in {step.within_s}"

    def until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = self.sim.now + timeout_s
        while not ready():
            assert not self.sim.exited, f"the daemon exited waiting for {what}"
            assert self.sim.now < deadline, (
                f"{what} not within {timeout_s} s (virtual); events: "
                f"{[e['event'] for e in self.capture.events]}"
            )
            self.sim.advance(TICK_S)

    def stop(self, within_s: tuple[float, float]) -> None:
        serving = self.sim.world.model.serving()
        content = serving.content if serving is not None else None
        self.serves = body(content.version) if content is not None else None
        began = self.sim.now
        self.sim.check_stops()  # SIGTERM; then invariant 8: the documented code, no child
        took = self.sim.now - began
        assert within_s[0] <= took <= within_s[1], f"stopped after {took:.2f} s, not {within_s}"

    def observed(self) -> Observed:
        sim = self.sim
        model = sim.world.model
        went_live = sorted((p for p in model.procs if p.live_at is not None), key=_live_at)
        live = tuple(p.epoch for p in went_live)
        # The harness's own check: the daemon saw exactly the LIVE moments the model had.
        reported = tuple(int(e["epoch"]) for e in self.events("child.serving"))
        assert reported == live, f"daemon reported LIVE {reported}, the model had {live}"
        assert sim.exit_code is not None
        outcome = Outcome(
            started=tuple(s.epoch for s in sim.world.spawned),
            live=live,
            serves=self.serves,
            exit_code=int(sim.exit_code),
            left_alive=len(model.alive()),
            **counts([e["event"] for e in self.capture.events]),
        )
        return Observed(outcome, model.max_alive)


def _live_at(proc: Proc) -> float:
    assert proc.live_at is not None
    return proc.live_at


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_the_model_gives_the_scenario_outcome(scenario: Scenario) -> None:
    with _captured() as capture:
        observed = ModelRun(scenario, capture).run()
    check(scenario, observed, "the model")
