"""The event loop's containment boundary (DESIGN-core §4).

No exception while handling one event may end the daemon or touch Envoy: PDEATHSIG ties
every Envoy to the daemon's life (ENVOY_FACTS §11), so a daemon that dies of its own bug
takes the proxy down with it (REVIEW-core finding 1 was exactly that). An unexpected
error is logged once per distinct place with its traceback (`daemon.internal_error`),
counted (`envoy_autoreload_internal_errors_total`), the caller's `heal` re-arms what a
half-run handler may have left unarmed, and the loop goes on. The same error in the same
place three times within a minute asks for a re-exec in place (`reexec.py`): a fresh
image with the same Envoys, rather than limping on. The one exception that is
let through is a start-up error (the start script cannot run Envoy at all): start-up
then fails with exit code 3, as the operator expects.
"""

from __future__ import annotations

import collections
import logging
import traceback
from collections.abc import Callable
from typing import Final

from envoy_autoreload.errors import SpawnError
from envoy_autoreload.logs import log_event
from envoy_autoreload.loop import Event
from envoy_autoreload.telemetry import Telemetry

logger = logging.getLogger(__name__)

Handler = Callable[[Event | None], None]


REPEATS_FOR_REEXEC: Final = 3
REPEAT_WINDOW_S: Final = 60.0


class Containment:
    def __init__(
        self,
        telemetry: Telemetry,
        heal: Callable[[], None],
        clock: Callable[[], float],
        on_repeated: Callable[[str], None],
    ) -> None:
        self._telemetry = telemetry
        self._heal = heal
        self._clock = clock
        self._on_repeated = on_repeated  # the same error again and again: re-exec
        self._seen: set[str] = set()
        self._recent: dict[str, collections.deque[float]] = {}
        self.errors: list[BaseException] = []  # the simulation's invariant 9 reads it

    def run(self, handler: Handler, event: Event | None, *, starting_up: bool) -> None:
        try:
            handler(event)
        except Exception as err:
            if isinstance(err, SpawnError) and starting_up:
                raise
            self._record(err, event)

    def _record(self, err: Exception, event: Event | None) -> None:
        self.errors.append(err)
        self._telemetry.internal_errors.inc()
        self._heal()
        frames = traceback.extract_tb(err.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        key = f"{type(err).__name__}@{where}"
        self._count(key)
        if key in self._seen:
            return
        self._seen.add(key)
        log_event(
            logger,
            logging.ERROR,
            "daemon.internal_error",
            f"{type(err).__name__}: {err} (while handling {event!r}); Envoy keeps serving, "
            "the daemon carries on; please report this",
            detail="".join(traceback.format_exception(err)).rstrip(),
        )

    def _count(self, key: str) -> None:
        """A fault that repeats in the same place is not going away by carrying on: a
        fresh image of the daemon (re-exec in place, Envoy untouched) is the remedy."""
        now = self._clock()
        recent = self._recent.setdefault(key, collections.deque(maxlen=REPEATS_FOR_REEXEC))
        recent.append(now)
        if len(recent) == REPEATS_FOR_REEXEC and now - recent[0] <= REPEAT_WINDOW_S:
            recent.clear()
            self._on_repeated(
                f"{key} raised {REPEATS_FOR_REEXEC} times within {REPEAT_WINDOW_S:g} s"
            )
