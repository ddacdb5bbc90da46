"""The queue of paths waiting to be applied: arrival order, parents first, on time."""

from __future__ import annotations

import itertools
import time

import pytest

from envoy_autoreload.watch.pending import PendingPaths


def test_each_read_is_sorted_and_reads_keep_their_order() -> None:
    paths = PendingPaths()
    paths.add({"/c/new/b", "/c/new"})
    paths.add({"/c/a", "/c/new/a"})
    assert paths.take_all() == ["/c/new", "/c/new/b", "/c/a", "/c/new/a"]
    assert not paths


def test_a_path_named_again_keeps_its_place_and_is_applied_once() -> None:
    paths = PendingPaths()
    paths.add({"/c/x"})
    paths.add({"/c/y", "/c/x"})
    assert len(paths) == 2
    assert "/c/x" in paths
    assert paths.take_all() == ["/c/x", "/c/y"]


def test_a_slice_stops_on_its_deadline_and_leaves_the_rest_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = itertools.count()  # one tick per look at the clock
    monkeypatch.setattr(time, "monotonic", lambda: float(next(clock)))
    paths = PendingPaths()
    paths.add({f"/c/f{i:03d}" for i in range(100)})
    taken = list(paths.pop_until(3.0))
    assert taken == ["/c/f000", "/c/f001", "/c/f002", "/c/f003"]
    assert "/c/f000" not in paths
    assert paths.take_all()[0] == "/c/f004"


def test_a_slice_past_its_deadline_still_takes_one() -> None:
    paths = PendingPaths()
    paths.add({"/c/a", "/c/b"})
    assert list(paths.pop_until(0.0)) == ["/c/a"]
    assert paths.take_all() == ["/c/b"]
