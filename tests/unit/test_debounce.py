"""The debouncer with a clock the test moves by hand."""

from __future__ import annotations

from envoy_autoreload.debounce import Debouncer


def test_due_after_the_quiet_window() -> None:
    debouncer = Debouncer(quiet_s=0.3, max_wait_s=5.0)
    assert debouncer.deadline() is None
    debouncer.add(10.0, {"a"})
    debouncer.add(10.2, {"b"})
    assert debouncer.deadline() == 10.5
    assert not debouncer.is_due(10.49)
    assert debouncer.is_due(10.5)
    assert debouncer.take() == {"a", "b"}
    assert debouncer.deadline() is None


def test_a_burst_of_500_writes_is_one_due_moment() -> None:
    debouncer = Debouncer(quiet_s=0.3, max_wait_s=5.0)
    due_moments = 0
    now = 0.0
    for i in range(500):
        now = i * 0.002
        if debouncer.is_due(now):
            due_moments += 1
            debouncer.take()
        debouncer.add(now, {f"f{i}"})
    assert debouncer.is_due(now + 0.3)
    assert len(debouncer.take()) == 500
    assert due_moments == 0


def test_an_endless_trickle_still_comes_due_at_max_wait() -> None:
    debouncer = Debouncer(quiet_s=0.3, max_wait_s=5.0)
    now = 100.0
    while not debouncer.is_due(now):
        debouncer.add(now, {"log"})
        now += 0.2  # always inside the quiet window
    assert now >= 105.0 and now < 105.3


def test_max_wait_is_never_shorter_than_the_quiet_window() -> None:
    debouncer = Debouncer(quiet_s=1.0, max_wait_s=0.1)
    debouncer.add(0.0, {"a"})
    assert debouncer.deadline() == 1.0
