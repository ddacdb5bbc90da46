"""The health gate: a new generation that reports LIVE is on probation for
--health-window seconds before it counts as good.

Validation proves a config parses and links; it cannot see a listener that fails after
LIVE (upstream PR #47492, #20584, #14295), a filter that crashes Envoy under traffic, or
an upstream that answers 503. So the new generation is watched: every round asks admin
(over a fresh connection, ENVOY_FACTS §9), reads the listener-failure counter, and
fetches every --health-url, off the loop (`ports.Health`). What the observations mean
is decided here, and a failure hands the generation to the supervisor's rollback.

A single bad answer is not a failure: admin or a URL must fail HEALTH_MISSES rounds in
a row (a GC pause, one slow upstream), while a listener that failed to be created, or
a process that died, fails at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final, Protocol

from envoy_autoreload.generations import Outcome
from envoy_autoreload.health import HealthObservation
from envoy_autoreload.lineage import Lineage
from envoy_autoreload.logs import log_event
from envoy_autoreload.ports import Health, Reactor
from envoy_autoreload.roster import Generation
from envoy_autoreload.settings import Settings
from envoy_autoreload.states import GenerationState, Timer

logger = logging.getLogger(__name__)

ROUND_S: Final = 0.5
HEALTH_MISSES: Final = 3
# Rounds that begin this close to the window's end are `final` (Health.begin_round):
# the one begun a round or more before the end is answered before it, even where one
# `/stats` takes 128 ms (20,000 clusters, bench/admincost.py).
FINAL_STRETCH_S: Final = 2 * ROUND_S


class Hooks(Protocol):
    def failed_probation(self, gen: Generation, check: str, saw: str) -> None: ...


@dataclass(slots=True)
class _Watch:
    """What probation has seen of the generation it watches."""

    gen: Generation
    ends_at: float  # the reactor's clock: the window's end
    admin_seen_live: bool = False
    admin_misses: int = 0
    listener_baseline: int | None = None
    url_misses: dict[str, int] = field(default_factory=dict)


class Probation:
    def __init__(
        self,
        settings: Settings,
        reactor: Reactor,
        health: Health | None,
        lineage: Lineage,
        hooks: Hooks,
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self._health = health
        self._lineage = lineage
        self._hooks = hooks
        self._watch: _Watch | None = None

    @property
    def on_probation(self) -> Generation | None:
        return self._watch.gen if self._watch is not None else None

    def on_live(self, gen: Generation) -> None:
        """Put a new generation on probation, or count it good at once: a config that
        passed before (a restart for a certificate, a rollback target) or no window."""
        self._end("superseded")
        config = gen.config
        if config is None:
            return
        window = self._settings.health_window_s
        if window <= 0 or self._lineage.outcome(config) is Outcome.GOOD:
            self._lineage.record(config, Outcome.GOOD, epoch=gen.epoch)
            return
        self._watch = _Watch(gen, ends_at=self._reactor.now() + window)
        if not self._failed_already(gen):
            self._lineage.record(config, Outcome.PROBATION, epoch=gen.epoch)
        log_event(
            logger,
            logging.INFO,
            "health.probation",
            f"on probation for {window:g} s",
            epoch=gen.epoch,
            pid=gen.pid,
            config=config.short,
        )
        self._reactor.set_timeout(Timer.PROBATION_END, window)
        self._reactor.set_timeout(Timer.HEALTH_ROUND, 0.0)

    def export(self, now: float) -> dict[str, object] | None:
        """For a re-exec: who is on probation, for how much longer, and what was seen."""
        watch = self._watch
        if watch is None or watch.gen.serving_at is None:
            return None
        left = self._settings.health_window_s - (now - watch.gen.serving_at)
        return {
            "pid": watch.gen.pid,
            "remaining_s": max(0.0, left),
            "admin_seen_live": watch.admin_seen_live,
            "listener_baseline": watch.listener_baseline,
        }

    def restore(self, saved: dict[str, object], gen: Generation) -> None:
        baseline = saved.get("listener_baseline")
        saved_left = saved.get("remaining_s")
        left = float(saved_left) if isinstance(saved_left, int | float) else 0.0
        self._watch = _Watch(
            gen,
            ends_at=self._reactor.now() + left,
            admin_seen_live=bool(saved.get("admin_seen_live")),
            listener_baseline=baseline if isinstance(baseline, int) else None,
        )
        self._reactor.set_timeout(Timer.PROBATION_END, left)
        self._reactor.set_timeout(Timer.HEALTH_ROUND, 0.0)

    def next_round(self) -> None:
        watch = self._watch
        if watch is None or watch.gen.state is not GenerationState.SERVING:
            return
        if self._health is not None:
            final = self._reactor.now() + FINAL_STRETCH_S >= watch.ends_at
            self._health.begin_round(watch.gen, final)
        self._reactor.set_timeout(Timer.HEALTH_ROUND, ROUND_S)

    def on_observation(self) -> None:
        """A round finished (the Health port's fd was readable)."""
        if self._health is None:
            return
        seen = self._health.take()
        watch = self._watch
        if seen is None or watch is None or seen.pid != watch.gen.pid:
            return  # a round about a generation no longer on probation
        verdict = _judge(watch, seen)
        if verdict is not None:
            self.fail(watch.gen, *verdict)

    def passed(self) -> None:
        """--health-window is over and nothing failed: the generation is good."""
        watch = self._watch
        if watch is None:
            return
        config = watch.gen.config
        assert config is not None
        self._lineage.record(config, Outcome.GOOD, epoch=watch.gen.epoch)
        log_event(
            logger,
            logging.INFO,
            "health.passed",
            f"passed {self._settings.health_window_s:g} s of probation; it is the last "
            "known good config now",
            epoch=watch.gen.epoch,
            pid=watch.gen.pid,
            config=config.short,
        )
        self._end("passed")

    def on_exited(self, gen: Generation, status: str) -> None:
        """A generation on probation that dies fails it at once (unless we stopped it)."""
        watch = self._watch
        if watch is None or watch.gen is not gen:
            return
        if gen.marks.stop_reason is not None or gen.marks.terminated:
            self._end("stopped")  # we stopped it: no verdict on its config
            return
        self.fail(gen, "process", f"Envoy exited ({status}) during probation")

    def fail(self, gen: Generation, check: str, saw: str) -> None:
        config = gen.config
        self._end("failed")
        log_event(
            logger,
            logging.ERROR,
            "health.failed",
            f"{check} check failed: {saw}",
            epoch=gen.epoch,
            pid=gen.pid,
            config=config.short if config is not None else None,
            check=check,
        )
        good = self._lineage.last_good()
        if self._settings.rollback and good is not None and good != config:
            # Remembered only when there is something else to run: with nothing to go
            # back to, recovery starts these bytes again, and refusing them later would
            # only refuse what serves.
            self._lineage.record(config, Outcome.FAILED, epoch=gen.epoch, detail=f"{check}: {saw}")
        self._hooks.failed_probation(gen, check, saw)

    def _failed_already(self, gen: Generation) -> bool:
        """Its bytes failed probation while it was starting (a SIGHUP restarted the very
        config on probation, and that one failed): the failure stands, and its own
        window, cut short by the rollback, proves nothing. One started when they had
        failed already (`reload --force`) tries them again on purpose."""
        return self._lineage.failed(gen.config) and not gen.retries_failed

    def _end(self, why: str) -> None:
        watch = self._watch
        if watch is None:
            return
        self._watch = None
        if why == "superseded" and not self._lineage.failed(watch.gen.config):
            self._lineage.record(watch.gen.config, Outcome.SUPERSEDED, epoch=watch.gen.epoch)
        log_event(
            logger,
            logging.DEBUG,
            "health.probation_ended",
            why,
            epoch=watch.gen.epoch,
            pid=watch.gen.pid,
            config=watch.gen.config_short,
        )
        self._reactor.cancel(Timer.HEALTH_ROUND)
        self._reactor.cancel(Timer.PROBATION_END)


def _judge(watch: _Watch, seen: HealthObservation) -> tuple[str, str] | None:
    """The failed check and what it saw, or None while all is well (or not yet sure).

    Admin answered by a newer epoch speaks of that one: from ~60 ms after its spawn a
    starting epoch answers admin, PRE_INITIALIZING for as long as it loads, with its own
    counters (ENVOY_FACTS §15). The generation on probation still serves the listener
    until then, so only its URLs are judged: a slow next start (a config waiting for
    xDS) used to fail it after three rounds, and record its good bytes as FAILED."""
    newer_answers = seen.admin_epoch is not None and seen.admin_epoch > watch.gen.epoch
    verdict = None if newer_answers else _judge_admin(watch, seen) or _judge_listener(watch, seen)
    return verdict or _judge_urls(watch, seen)


def _judge_admin(watch: _Watch, seen: HealthObservation) -> tuple[str, str] | None:
    if seen.admin_state == "LIVE" and seen.admin_epoch in (None, watch.gen.epoch):
        watch.admin_seen_live = True
        watch.admin_misses = 0
    elif watch.admin_seen_live:
        # Only once admin has answered LIVE: without a known admin address (no
        # --admin-address, no admin in the config) there is nothing to ask.
        watch.admin_misses += 1
        if watch.admin_misses >= HEALTH_MISSES:
            state = seen.admin_state or "no answer"
            return "admin", f"admin reports {state} (epoch {seen.admin_epoch}), not LIVE"
    return None


def _judge_listener(watch: _Watch, seen: HealthObservation) -> tuple[str, str] | None:
    failures = seen.listener_create_failures
    if failures is not None:
        if watch.listener_baseline is None:
            watch.listener_baseline = failures
        elif failures > watch.listener_baseline:
            return "listener", (
                f"listener_manager.listener_create_failure rose from "
                f"{watch.listener_baseline} to {failures}"
            )
    return None


def _judge_urls(watch: _Watch, seen: HealthObservation) -> tuple[str, str] | None:
    for result in seen.urls:
        misses = 0 if result.ok else watch.url_misses.get(result.url, 0) + 1
        watch.url_misses[result.url] = misses
        if misses >= HEALTH_MISSES:
            return "url", f"{result.url} answered {result.detail} {misses} times in a row"
    return None
