"""heap.settle: only a daemon process freezes its heap (heap.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from envoy_autoreload import heap


@pytest.fixture
def not_enabled(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(heap, "_enabled", False)
    try:
        yield
    finally:
        gc.unfreeze()  # what a test froze is the test runner's


def _collected(obj: object) -> bool:
    """Whether the collector's passes still walk `obj` (a frozen one is in none)."""
    return any(found is obj for found in gc.get_objects())


def test_the_supervisor_run_in_process_freezes_nothing(not_enabled: None) -> None:
    held = [1, 2, 3]
    heap.settle()
    assert gc.get_freeze_count() == 0
    assert _collected(held)


def test_the_daemon_takes_what_it_holds_out_of_the_passes(not_enabled: None) -> None:
    held = [1, 2, 3]
    heap.enable()
    heap.settle()
    assert gc.get_freeze_count() > 0
    assert not _collected(held)
    later = [4, 5, 6]
    assert _collected(later), "what comes after is collected as before"
