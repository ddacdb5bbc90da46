"""What a user of the proxy saw: a request every 100 ms, for as long as a fault test runs.

Each request opens a new connection (ENVOY_FACTS §9: a kept-alive one would keep
reaching a draining process and hide an outage), so a failure means a client arriving
at that moment was refused or answered with an error.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from tests.daemon import Daemon
from tests.helpers import http_get, wait_until

PROBE_INTERVAL_S = 0.1


@dataclass(frozen=True, slots=True)
class Answer:
    at: float  # time.monotonic() when the request was sent
    body: str | None  # None: refused, reset, timed out or not a 200


@dataclass(frozen=True, slots=True)
class Outage:
    """Consecutive failed requests, bounded by the answered ones around them."""

    failed: int
    last_ok: float | None  # the answer before it (None: it began with the probe)
    next_ok: float | None  # the answer after it (None: it had not ended)

    @property
    def duration_s(self) -> float | None:
        """At most this long: from the last answer before it to the first after it."""
        if self.last_ok is None or self.next_ok is None:
            return None
        return self.next_ok - self.last_ok


class ServingProbe:
    """GETs the listener every 100 ms in a thread; use as a context manager."""

    def __init__(self, port: int, interval_s: float = PROBE_INTERVAL_S) -> None:
        self.port = port
        self.interval_s = interval_s
        self._answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serving-probe", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            result = http_get(self.port, timeout_s=1.0)
            body = result[1] if result is not None and result[0] == 200 else None
            with self._lock:
                self._answers.append(Answer(sent, body))
            self._stop.wait(max(0.0, sent + self.interval_s - time.monotonic()))

    def __enter__(self) -> ServingProbe:
        self._thread.start()
        wait_until(lambda: self.answers(), timeout_s=5, what="the probe's first answer")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def answers(self) -> list[Answer]:
        with self._lock:
            return list(self._answers)

    def bodies(self) -> list[str]:
        return [a.body for a in self.answers() if a.body is not None]

    def failures(self) -> list[Answer]:
        return [a for a in self.answers() if a.body is None]

    def outages(self) -> list[Outage]:
        outages: list[Outage] = []
        last_ok: float | None = None
        failed = 0
        for answer in self.answers():
            if answer.body is None:
                failed += 1
                continue
            if failed:
                outages.append(Outage(failed, last_ok, answer.at))
                failed = 0
            last_ok = answer.at
        if failed:
            outages.append(Outage(failed, last_ok, None))
        return outages

    def wait_for_body(self, body: str, timeout_s: float = 15.0) -> None:
        """Until a request sent from now on sees `body`: it serves to new clients now
        (and any outage before has ended)."""
        since = time.monotonic()
        wait_until(
            lambda: any(a.body == body for a in self.answers() if a.at >= since),
            timeout_s=timeout_s,
            what=f"the probe to see {body!r}",
        )

    def assert_never_failed(self) -> None:
        answers = self.answers()
        failed = [a for a in answers if a.body is None]
        assert answers and not failed, (
            f"{len(failed)} of {len(answers)} requests failed: outages {self.outages()}"
        )
        span = answers[-1].at - answers[0].at
        # The probe really ran throughout (a stalled thread would prove nothing).
        assert len(answers) >= span / self.interval_s * 0.5, (len(answers), span)


def serves_after_drain(daemon: Daemon, probe: ServingProbe, body: str, epoch: int) -> None:
    """`epoch` goes LIVE, new clients get `body`, and the epoch before it finishes its
    drain: a probe kept until here has seen the whole hand-over."""
    daemon.wait_event("child.serving", epoch=epoch, timeout_s=30)
    probe.wait_for_body(body)
    daemon.wait_event("child.exited", epoch=epoch - 1)
