"""Model conformance, the real side: each scenario of `tests/conformance_scenarios.py` run
by the real daemon against the real Envoy 1.40, with real files, ports and signals.

`tests/simulation/test_conformance.py` runs the same scenarios on the model and asserts
the same outcome: a disagreement is a bug in the model (DESIGN-core §3). Envoy is
observed from outside the daemon where it can be: /proc for how many of the family are
alive (sampled throughout), a fresh HTTP connection for what serves. Which epochs went
LIVE comes from the daemon's `child.serving`, logged only once Envoy's admin said LIVE at
that epoch over a fresh connection.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import assert_never

import pytest

from tests.conformance_scenarios import (
    SCENARIOS,
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
from tests.daemon import Daemon
from tests.envoy.conftest import EnvoyFamily, slow_to_initialize
from tests.helpers import WaitTimeout, free_port, holds_for, port_held, wait_until

SAMPLE_INTERVAL_S = 0.05


class FamilySampler:
    """How many processes of the family were alive at once, read from /proc in a thread
    for the whole scenario (the daemon's own account is not what is checked)."""

    def __init__(self, family: EnvoyFamily) -> None:
        self._family = family
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="family-sampler", daemon=True)
        self.max_alive = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max_alive = max(self.max_alive, len(self._family.our_processes()))
            self._stop.wait(SAMPLE_INTERVAL_S)

    @contextlib.contextmanager
    def running(self) -> Iterator[FamilySampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=10)


class RealRun:
    """One scenario against the real daemon and Envoy; the steps' meaning mirrors the
    model's side."""

    def __init__(self, scenario: Scenario, family: EnvoyFamily, ports: contextlib.ExitStack):
        self.scenario = scenario
        self.family = family
        self.ports = ports
        self.held_port: int | None = None
        self.frozen: int | None = None
        self.serves: str | None = None
        self.exit_code: int | None = None
        family.write_script(parent_shutdown_s=scenario.parent_shutdown_s)
        args = family.watched("--start-timeout", f"{scenario.start_timeout_s:g}")
        self.daemon: Daemon = family.start(*args)
        self.step_done_at = time.monotonic()

    def run(self) -> Observed:
        with FamilySampler(self.family).running() as sampler:
            try:
                for step in self.scenario.steps:
                    self.do(step)
                    self.step_done_at = time.monotonic()
            finally:
                self.thaw()  # a stopped Envoy would hold up the cleanup's SIGTERM
        assert self.exit_code is not None, "a scenario ends with Stop()"
        daemon = self.daemon
        outcome = Outcome(
            started=tuple(int(e["epoch"]) for e in daemon.events("child.started")),
            live=tuple(int(e["epoch"]) for e in daemon.events("child.serving")),
            serves=self.serves,
            exit_code=self.exit_code,
            left_alive=len(self.family.our_processes()),
            **counts([str(e["event"]) for e in daemon.events()]),
        )
        return Observed(outcome, sampler.max_alive)

    def do(self, step: Step) -> None:
        family, daemon = self.family, self.daemon
        match step:
            case Write(version=version, binds_held_port=binds, slow=slow):
                extra = self.held_port if binds else None
                assert not binds or extra is not None, "HoldPort() comes first"
                text = family.render(body(version), extra_listener_port=extra)
                family.write_raw(slow_to_initialize(text, free_port()) if slow else text)
            case Sighup(count=count):
                for _ in range(count):
                    daemon.signal(signal.SIGHUP)
            case HoldPort():
                self.held_port = self.ports.enter_context(port_held())
            case ReleasePort():
                self.ports.close()
                self.held_port = None
            case Freeze():
                self.frozen = self.ours(self.reported("serving"))
                os.kill(self.frozen, signal.SIGSTOP)
            case Thaw():
                self.thaw()
            case Kill(role=role, signum=signum):
                os.kill(self.ours(self.reported(role)), signum)
            case Await():
                self.await_event(step)
            case AwaitInitializing(epoch=epoch):
                wait_until(
                    lambda: self.initializing(epoch),
                    timeout_s=30,
                    what=f"epoch {epoch} PRE_INITIALIZING on admin",
                )
            case Quiet(seconds=seconds):
                started = len(daemon.events("child.started"))
                holds_for(
                    lambda: len(daemon.events("child.started")) == started,
                    duration_s=seconds,
                    what="no child started",
                )
            case Stop(within_s=within_s):
                self.stop(within_s)
            case _:
                assert_never(step)

    def reported(self, role: str) -> int:
        """The PID of the Envoy the daemon last reported in `role`."""
        reported = self.daemon.events(f"child.{role}")
        assert reported, f"the daemon never reported a {role} Envoy"
        return int(reported[-1]["pid"])

    def ours(self, pid: int) -> int:
        """Only a process of this family: never a PID the kernel reused for another."""
        assert pid in self.family.our_processes(), f"Envoy {pid} is not alive"
        return pid

    def thaw(self) -> None:
        if self.frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.frozen, signal.SIGCONT)
            self.frozen = None

    def await_event(self, step: Await) -> None:
        fields = step.fields
        self.daemon.wait_event(
            step.event,
            count=step.count,
            timeout_s=step.timeout_s,
            where=lambda e: all(e.get(k) == v for k, v in fields.items()),
        )
        if step.within_s is not None:
            low, high = step.within_s
            took = time.monotonic() - self.step_done_at
            assert low <= took <= high, f"{step.event} after {took:.2f} s, not in {step.within_s}"

    def initializing(self, epoch: int) -> bool:
        info = self.family.server_info()  # the child answers admin while it starts (§15)
        return (
            info is not None
            and info.get("state") == "PRE_INITIALIZING"
            and int(info["command_line_options"]["restart_epoch"]) == epoch
        )

    def stop(self, within_s: tuple[float, float]) -> None:
        try:
            self.serves = wait_until(self.family.body, timeout_s=2, what="a listener answer")
        except WaitTimeout:
            self.serves = None
        began = time.monotonic()
        self.daemon.signal(signal.SIGTERM)
        self.exit_code = self.daemon.wait_exit(timeout_s=60)
        took = time.monotonic() - began
        assert within_s[0] <= took <= within_s[1], f"stopped after {took:.2f} s, not {within_s}"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_the_real_envoy_gives_the_scenario_outcome(
    scenario: Scenario, envoy_family: EnvoyFamily
) -> None:
    with contextlib.ExitStack() as ports:
        observed = RealRun(scenario, envoy_family, ports).run()
    check(scenario, observed, "the real Envoy")
