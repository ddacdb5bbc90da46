"""The daemon's Prometheus metrics, in a registry of their own (no import-time global).

A module of its own because `prometheus_client` imports `http.server`, `urllib`,
`email` and `ssl` with it, about 0.02 s: `Telemetry` builds these only when a metric
is first touched, which is after epoch 0 is spawned (issue 16, goal 1).
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

RESTART_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# A turn of the event loop takes well under a millisecond; 50 ms is the most an event may
# wait (issue 16), and a turn of seconds is a stall someone should hear about.
LOOP_BUSY_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._register_counters("envoy_autoreload", registry)
        self._register_gauges("envoy_autoreload", registry)
        self.epoch.set(-1)

    def _register_counters(self, prefix: str, registry: CollectorRegistry) -> None:
        self.restarts = Counter(
            f"{prefix}_restarts",
            "Restart attempts by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.validation_failures = Counter(
            f"{prefix}_validation_failures",
            "Configs refused by envoy --mode validate.",
            registry=registry,
        )
        self.child_exits = Counter(
            f"{prefix}_child_exits",
            "Envoy processes that exited, by cause.",
            ["cause"],
            registry=registry,
        )
        self.watch_events = Counter(
            f"{prefix}_watch_events",
            "Filesystem events seen (after filtering).",
            registry=registry,
        )
        self.rollbacks = Counter(
            f"{prefix}_rollbacks",
            "Rollbacks to the last good config, by the check that failed.",
            ["reason"],
            registry=registry,
        )
        self.internal_errors = Counter(
            f"{prefix}_internal_errors",
            "Exceptions contained by the event loop (a bug of ours; Envoy kept serving).",
            registry=registry,
        )

    def _register_gauges(self, prefix: str, registry: CollectorRegistry) -> None:
        self.restart_duration = Histogram(
            f"{prefix}_restart_duration_seconds",
            "From a restart request to the new epoch LIVE.",
            buckets=RESTART_BUCKETS,
            registry=registry,
        )
        self.epoch = Gauge(
            f"{prefix}_epoch",
            "Restart epoch of the serving Envoy (-1: none).",
            registry=registry,
        )
        self.generations_alive = Gauge(
            f"{prefix}_generations_alive",
            "Envoy processes of this daemon alive now.",
            registry=registry,
        )
        self.config_info = Gauge(
            f"{prefix}_config_info",
            "1 for the sha256 of the config generation that serves.",
            ["sha256"],
            registry=registry,
        )
        self.last_success = Gauge(
            f"{prefix}_last_success_timestamp_seconds",
            "Unix time the last restart (or the first start) went LIVE.",
            registry=registry,
        )
        self.loop_busy = Histogram(
            f"{prefix}_loop_busy_seconds",
            "Each turn of the event loop, from select() returning to the next select(): "
            "the longest an event that became ready meanwhile waited.",
            buckets=LOOP_BUSY_BUCKETS,
            registry=registry,
        )
        self.loop_busy_max = Gauge(
            f"{prefix}_loop_busy_max_seconds",
            "The longest turn of the event loop since the daemon started.",
            registry=registry,
        )
