"""Restart requests and the batches that answer them.

Every request (a signal, settled file changes, a control `reload`) gets a number. Queued
requests run as one batch; a batch answers every request up to its number. `finish()` is
where every attempt ends, whatever the outcome: the metric and last-restart record,
systemd's READY after its RELOADING, and the control clients waiting for it. Before, that
triple was repeated at six sites and one of them forgot READY (REVIEW-core finding 9).

`answered_through` is the newest request number whose outcome is known: the simulation
checks that no request is ever lost (answered, performed, or still pending).
"""

from __future__ import annotations

import logging
from typing import Final, Literal

from envoy_autoreload.control import ControlConnection, ControlDesk, ControlReply
from envoy_autoreload.ports import Reactor
from envoy_autoreload.telemetry import Outcome, Telemetry

logger = logging.getLogger(__name__)

MAX_QUEUED_REASONS: Final = 8
# Reasons a cold start or respawn carries that are not requests of their own.
NOT_REQUESTS: Final = frozenset({"startup", "recovery"})

Ending = Outcome | Literal["unchanged", "stopping"]


class Batches:
    def __init__(self, reactor: Reactor, desk: ControlDesk, telemetry: Telemetry) -> None:
        self._reactor = reactor
        self._desk = desk
        self._telemetry = telemetry
        self.request_seq = 0  # the newest request's number
        self.seq = 0  # the newest batch: it answers requests up to this number
        self.answered_through = 0
        self.queued: list[str] = []
        self._began_at: float | None = None

    # -- requests -----------------------------------------------------------------
    def add(self, reason: str) -> tuple[int, bool]:
        """Queue a request; returns its number and whether it is the first queued."""
        self.request_seq += 1
        first = not self.queued
        if reason not in self.queued and len(self.queued) < MAX_QUEUED_REASONS:
            self.queued.append(reason)
        return self.request_seq, first

    def take(self) -> str:
        """Begin a batch with everything queued; returns its reason."""
        reason = ",".join(self.queued)
        self.queued.clear()
        self.seq = self.request_seq
        self._began_at = self._reactor.now()
        self._telemetry.restart_began(reason, f"reloading: {reason}")
        return reason

    def requeue(self, reason: str) -> None:
        """A batch that could not be carried out goes back in the queue (nothing is
        dropped silently): it passes the gate again once something serves."""
        for part in reason.split(","):
            if part and part not in NOT_REQUESTS and part not in self.queued:
                self.queued.append(part)

    def wait(self, seq: int, conn: ControlConnection) -> None:
        self._desk.wait(seq, conn)

    @property
    def in_flight(self) -> bool:
        """A batch began and has not finished (systemd was told RELOADING)."""
        return self._began_at is not None

    # -- outcomes -----------------------------------------------------------------
    def finish(
        self,
        ending: Ending,
        reason: str,
        *,
        seq: int,
        status: str,
        error: str | None = None,
        epoch: int | None = None,
        message: str | None = None,
    ) -> None:
        """One attempt is over: record it, tell systemd, answer the clients it covers."""
        began, self._began_at = self._began_at, None
        if ending == "unchanged":
            if began is not None:
                self._telemetry.serving_again(status)  # READY after our RELOADING
        elif ending != "stopping":
            duration = self._reactor.now() - began if began is not None else None
            self._telemetry.restart_done(
                ending, reason, duration_s=duration, error=error, status=status
            )
        ok = ending in ("success", "unchanged")
        text = message or (error if error is not None else ending)
        self._answer(seq, ControlReply(ok, text, epoch))

    def retry_pending(self, reason: str, *, error: str, status: str) -> None:
        """A start failed and will be retried: counted, but nobody is answered yet and
        systemd stays in RELOADING until the retries end."""
        began = self._began_at
        duration = self._reactor.now() - began if began is not None else None
        self._telemetry.restart_done(
            "start_failed", reason, duration_s=duration, error=error, status=status
        )

    def served_without_batch(self, status: str, seq: int, reply: ControlReply) -> None:
        """An Envoy serves again after a recovery: READY, and any request it covers."""
        self._telemetry.serving_again(status)
        self._answer(seq, reply)

    def _answer(self, seq: int, reply: ControlReply) -> None:
        if seq:
            self.answered_through = max(self.answered_through, seq)
            self._desk.answer(seq, reply)
