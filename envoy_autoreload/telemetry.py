"""What the daemon tells the outside world: Prometheus metrics, the status snapshot, and
systemd's notify messages. The supervisor reports facts here; nothing here decides.

The status snapshot is an immutable dict the event loop replaces whole after each event
(one reference assignment), so the HTTP thread only ever reads a consistent picture and
never touches supervisor state. The metrics live in a registry of this object's own
(no import-time global), whose types are safe to read from another thread.

Errors are published in brief (`brief_error`): Envoy's message for a type error in the
config quotes the whole bootstrap as JSON (ENVOY_FACTS §1), inline TLS keys and
credentials included, and /status may be read by any local user or, with
--status-allow-remote, beyond the host. The full text goes to the log only.
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from envoy_autoreload.notify import Notifier

Outcome = Literal["success", "start_failed", "validation_failed", "refused", "abandoned"]
ExitCause = Literal["drained", "start_failed", "died", "stopped", "replaced"]

RESTART_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# A turn of the event loop takes well under a millisecond; 50 ms is the most an event may
# wait (issue 16), and a turn of seconds is a stall someone should hear about.
LOOP_BUSY_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BRIEF_ERROR_CHARS: Final = 200
TRUNCATED: Final = "… (truncated, see the log)"


def brief_error(text: str | None) -> str | None:
    """An error as /status may show it: every `{...}` block elided, whitespace folded onto
    one line, at most BRIEF_ERROR_CHARS characters. Runs on the event loop for each
    failed restart, so a 1 MiB message is scanned by regex, not char by char."""
    if text is None:
        return None
    brief = " ".join(_elide_blocks(text).split())
    if len(brief) > BRIEF_ERROR_CHARS:
        brief = brief[:BRIEF_ERROR_CHARS].rstrip() + TRUNCATED
    return brief


_BLOCK_SYNTAX: Final = re.compile(r'[{}"\\]')


def _elide_blocks(text: str) -> str:
    """`text` with each top-level `{...}` replaced by `{...}`. JSON-aware: a brace inside
    a quoted string does not end a block early; an unclosed block runs to the end."""
    kept: list[str] = []
    kept_chars = 0
    depth = 0
    in_string = False
    segment_start = 0
    escaped_at = -1
    for match in _BLOCK_SYNTAX.finditer(text):
        char, pos = match.group(), match.start()
        if depth == 0:
            if char == "{":
                kept += (text[segment_start:pos], "{...}")
                kept_chars += pos - segment_start
                depth = 1
                if kept_chars > 8 * BRIEF_ERROR_CHARS:
                    return "".join(kept)  # enough to show; the rest is cut anyway
        elif pos == escaped_at:
            continue
        elif char == "\\":
            escaped_at = pos + 1 if in_string else -1
        elif char == '"':
            in_string = not in_string
        elif not in_string:
            depth += 1 if char == "{" else -1
            if depth == 0:
                segment_start = pos + 1  # the block ended: keep what follows
    if depth == 0:
        kept.append(text[segment_start:])
    return "".join(kept)


@dataclass(frozen=True, slots=True)
class RestartRecord:
    at: str
    reason: str
    outcome: Outcome
    duration_s: float | None
    error: str | None


class Telemetry:
    def __init__(self, notifier: Notifier | None = None) -> None:
        self.notifier = notifier or Notifier()
        self.registry = CollectorRegistry(auto_describe=True)
        self._register_counters("envoy_autoreload")
        self._register_gauges("envoy_autoreload")
        self.epoch.set(-1)
        self.last_restart: RestartRecord | None = None
        self.last_validation_error: str | None = None
        self.snapshot: Mapping[str, object] = {"state": "starting", "serving": None}
        self._ready_sent = False
        self._config_sha: str | None = None
        self._loop_busy_max_s = 0.0

    def _register_counters(self, prefix: str) -> None:
        self.restarts = Counter(
            f"{prefix}_restarts",
            "Restart attempts by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.validation_failures = Counter(
            f"{prefix}_validation_failures",
            "Configs refused by envoy --mode validate.",
            registry=self.registry,
        )
        self.child_exits = Counter(
            f"{prefix}_child_exits",
            "Envoy processes that exited, by cause.",
            ["cause"],
            registry=self.registry,
        )
        self.watch_events = Counter(
            f"{prefix}_watch_events",
            "Filesystem events seen (after filtering).",
            registry=self.registry,
        )
        self.rollbacks = Counter(
            f"{prefix}_rollbacks",
            "Rollbacks to the last good config, by the check that failed.",
            ["reason"],
            registry=self.registry,
        )
        self.internal_errors = Counter(
            f"{prefix}_internal_errors",
            "Exceptions contained by the event loop (a bug of ours; Envoy kept serving).",
            registry=self.registry,
        )

    def _register_gauges(self, prefix: str) -> None:
        self.restart_duration = Histogram(
            f"{prefix}_restart_duration_seconds",
            "From a restart request to the new epoch LIVE.",
            buckets=RESTART_BUCKETS,
            registry=self.registry,
        )
        self.epoch = Gauge(
            f"{prefix}_epoch",
            "Restart epoch of the serving Envoy (-1: none).",
            registry=self.registry,
        )
        self.generations_alive = Gauge(
            f"{prefix}_generations_alive",
            "Envoy processes of this daemon alive now.",
            registry=self.registry,
        )
        self.config_info = Gauge(
            f"{prefix}_config_info",
            "1 for the sha256 of the config generation that serves.",
            ["sha256"],
            registry=self.registry,
        )
        self.last_success = Gauge(
            f"{prefix}_last_success_timestamp_seconds",
            "Unix time the last restart (or the first start) went LIVE.",
            registry=self.registry,
        )
        self.loop_busy = Histogram(
            f"{prefix}_loop_busy_seconds",
            "Each turn of the event loop, from select() returning to the next select(): "
            "the longest an event that became ready meanwhile waited.",
            buckets=LOOP_BUSY_BUCKETS,
            registry=self.registry,
        )
        self.loop_busy_max = Gauge(
            f"{prefix}_loop_busy_max_seconds",
            "The longest turn of the event loop since the daemon started.",
            registry=self.registry,
        )

    # -- facts from the supervisor --------------------------------------------
    def loop_turned(self, busy_s: float) -> None:
        """The reactor's `on_busy`: one turn of the loop took `busy_s`. Runs on every
        turn, so it only counts: a histogram bucket and, rarely, a new maximum."""
        self.loop_busy.observe(busy_s)
        if busy_s > self._loop_busy_max_s:
            self._loop_busy_max_s = busy_s
            self.loop_busy_max.set(busy_s)

    def serving_config(self, sha256: str | None) -> None:
        """`envoy_autoreload_config_info{sha256}`: one series, the serving config's."""
        if sha256 == self._config_sha:
            return
        self.config_info.clear()
        if sha256 is not None:
            self.config_info.labels(sha256=sha256).set(1)
        self._config_sha = sha256

    def restart_began(self, reason: str, status: str) -> None:
        if self._ready_sent:
            self.notifier.reloading(status)

    def restart_done(
        self,
        outcome: Outcome,
        reason: str,
        *,
        duration_s: float | None = None,
        error: str | None = None,
        status: str,
    ) -> None:
        self.restarts.labels(outcome=outcome).inc()
        if outcome == "success":
            self.last_success.set(time.time())
            if duration_s is not None:
                self.restart_duration.observe(duration_s)
        if outcome == "validation_failed":
            self.validation_failures.inc()
            self.last_validation_error = brief_error(error)
        self.last_restart = RestartRecord(
            at=datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            reason=reason,
            outcome=outcome,
            duration_s=round(duration_s, 3) if duration_s is not None else None,
            error=brief_error(error),
        )
        if outcome != "start_failed":  # a retry may follow; READY comes when it is over
            self.serving_again(status)

    def serving_again(self, status: str) -> None:
        """READY=1: the first time an Envoy serves, and after each restart attempt ends."""
        if not self._ready_sent:
            self.last_success.set(time.time())
        self._ready_sent = True
        self.notifier.ready(status)

    def child_exited(self, cause: ExitCause) -> None:
        self.child_exits.labels(cause=cause).inc()

    def stopping(self, status: str) -> None:
        self.notifier.stopping(status)

    def publish(self, snapshot: Mapping[str, object], status_line: str | None) -> None:
        self.snapshot = snapshot
        if status_line is not None:
            self.notifier.status(status_line)

    def last_restart_dict(self) -> dict[str, object] | None:
        return asdict(self.last_restart) if self.last_restart is not None else None
