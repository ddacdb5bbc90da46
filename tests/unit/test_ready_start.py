"""`ReadyStart.ready` asks the check ahead before it reads anything: at a burst's
deadline the files may still be applied a slice a turn (10,000 of them), and reading
the content then (`current()`) hashes them all in one turn of the loop: a 256 ms
stall in bench/loopstall.py before this order (issue 16, goal 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from envoy_autoreload.ready_start import ReadyStart


class _Anything:
    """Answers every question the quiet check asks with "nothing under way"."""

    epoch = 1
    marks = type("Marks", (), {"doomed": False})()
    config = Path("/etc/envoy/envoy.yaml")

    def serving(self) -> _Anything:
        return self

    def draining(self) -> list[object]:
        return []

    def socket_taken(self, serving: object) -> bool:
        return False

    def has_deadline(self, key: object) -> bool:
        return False

    def now(self) -> float:
        return 100.0

    def config_flags(self, serving: object) -> tuple[str, ...]:
        return ()


class _NotReady:
    asked = 0

    def ready_for(self, serving: object, now: float, flags: object) -> None:
        self.asked += 1
        return None


class _Hooks:
    def current(self) -> None:
        raise AssertionError("the content was read though the check ahead was not ready")


def test_nothing_is_read_while_the_check_ahead_is_not_ready() -> None:
    anything, check_ahead = _Anything(), _NotReady()
    ready = ReadyStart(
        cast(Any, anything),  # settings
        cast(Any, anything),  # reactor
        cast(Any, anything),  # roster
        cast(Any, None),  # gatekeeper: never reached
        cast(Any, check_ahead),
        cast(Any, None),  # triggers: never reached
        cast(Any, anything),  # family
        cast(Any, None),  # processes: never reached
        _Hooks(),
    )
    assert ready.ready() is None
    assert check_ahead.asked == 1
