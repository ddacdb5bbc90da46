"""What one round of health observations means (probation's `_judge`): a single bad
answer is no failure, three in a row are; a listener failure or a death fails at once."""

from __future__ import annotations

from typing import cast

from envoy_autoreload.health import HealthObservation, UrlResult
from envoy_autoreload.probation import HEALTH_MISSES, _judge, _Watch
from envoy_autoreload.roster import Generation

URL = "http://127.0.0.1:8080/"


class _Gen:
    epoch = 3
    pid = 4242


def watch() -> _Watch:
    return _Watch(cast(Generation, _Gen()), ends_at=0.0)


def seen(
    state: str | None = "LIVE",
    epoch: int | None = 3,
    failures: int | None = 0,
    url_ok: bool | None = True,
) -> HealthObservation:
    urls = () if url_ok is None else (UrlResult(URL, url_ok, "HTTP 200" if url_ok else "HTTP 503"),)
    return HealthObservation(3, 4242, state, epoch, failures, urls)


def test_a_healthy_round_is_no_verdict() -> None:
    assert _judge(watch(), seen()) is None


def test_a_url_fails_only_after_misses_in_a_row() -> None:
    w = watch()
    for _ in range(HEALTH_MISSES - 1):
        assert _judge(w, seen(url_ok=False)) is None
    assert _judge(w, seen(url_ok=True)) is None  # one good answer starts the count again
    for _ in range(HEALTH_MISSES - 1):
        assert _judge(w, seen(url_ok=False)) is None
    verdict = _judge(w, seen(url_ok=False))
    assert verdict is not None and verdict[0] == "url" and "HTTP 503" in verdict[1]


def test_admin_counts_only_once_it_answered_live() -> None:
    """Without a known admin address nothing answers: that is no failure."""
    w = watch()
    for _ in range(HEALTH_MISSES * 2):
        assert _judge(w, seen(state=None, epoch=None, failures=None)) is None
    assert _judge(w, seen()) is None
    for _ in range(HEALTH_MISSES - 1):
        assert _judge(w, seen(state=None, epoch=None)) is None
    verdict = _judge(w, seen(state="DRAINING"))
    assert verdict is not None and verdict[0] == "admin" and "DRAINING" in verdict[1]


def test_admin_at_an_older_epoch_is_not_this_generation_live() -> None:
    w = watch()
    assert _judge(w, seen()) is None
    results = [_judge(w, seen(epoch=2)) for _ in range(HEALTH_MISSES)]
    assert results[-1] is not None and results[-1][0] == "admin"


def test_a_newer_epoch_answering_admin_is_no_verdict_on_this_one() -> None:
    """The next epoch, still loading, answers admin (ENVOY_FACTS §15) with its own
    state and counters: neither counts for or against the generation on probation;
    its URLs (the listener is still its own) do."""
    w = watch()
    assert _judge(w, seen(failures=0)) is None
    for _ in range(HEALTH_MISSES * 2):
        assert _judge(w, seen(state="PRE_INITIALIZING", epoch=4, failures=5)) is None
    assert w.listener_baseline == 0, "the newer epoch's counter is not this one's"
    for _ in range(HEALTH_MISSES - 1):
        assert _judge(w, seen(state="PRE_INITIALIZING", epoch=4, url_ok=False)) is None
    verdict = _judge(w, seen(state="PRE_INITIALIZING", epoch=4, url_ok=False))
    assert verdict is not None and verdict[0] == "url"


def test_a_listener_failure_after_live_fails_at_once() -> None:
    w = watch()
    assert _judge(w, seen(failures=2)) is None  # what it had at LIVE is the baseline
    assert _judge(w, seen(failures=2)) is None
    verdict = _judge(w, seen(failures=3))
    assert verdict is not None and verdict[0] == "listener" and "from 2 to 3" in verdict[1]
