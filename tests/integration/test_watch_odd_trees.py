"""Odd trees that raised inside the loop (review #13): inotify_add_watch(2) errnos the
watcher did not expect, and trees deeper than Python's recursion limit. Each must leave
the daemon watching the rest, with one warning."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from envoy_autoreload.watch.changes import ChangeDetector
from envoy_autoreload.watch.filters import NoiseFilter
from tests.integration.watch_harness import (
    assert_sees,
    deep_tree,
    open_detector,
    remove_deep_tree,
)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify only")

NAME = "n" * 250  # under NAME_MAX (255); 17 of them exceed PATH_MAX (4096)


def _long_real_path(base: Path) -> Path:
    """A directory whose real path exceeds PATH_MAX, reachable through a short one.

    `base/s1 -> N/.../N` (10 levels) and, at its end, `s2 -> N/.../N` (10 more):
    `base/s1/s2` resolves in the kernel (each string is under PATH_MAX), while its
    real path, what the walk hands to inotify_add_watch(2), is over 5000 bytes.
    """
    base.mkdir()
    half = "/".join([NAME] * 10)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(20):
            os.mkdir(NAME, dir_fd=fd)
            child = os.open(NAME, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    os.symlink(half, base / "s1")
    os.symlink(half, base / "s1" / "s2")  # inside the 10th level: s1/s2 is 20 deep
    return base / "s1" / "s2"


def _events(caplog: pytest.LogCaptureFixture, name: str) -> int:
    return sum(getattr(r, "autoreload_event", None) == name for r in caplog.records)


@pytest.fixture
def detectors() -> Iterator[list[ChangeDetector]]:
    created: list[ChangeDetector] = []
    yield created
    for detector in created:
        detector.close()


@linux_only
def test_a_directory_over_path_max_is_reported_not_fatal(
    tmp_path: Path, detectors: list[ChangeDetector], caplog: pytest.LogCaptureFixture
) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "envoy.yaml").write_text("version: 1\n")
    os.symlink(_long_real_path(tmp_path / "long"), conf / "deep")
    caplog.set_level(logging.WARNING)
    detector = open_detector([conf], "inotify")  # raised ENAMETOOLONG before
    detectors.append(detector)
    assert _events(caplog, "watch.unwatchable") == 1, caplog.text
    before = detector.snapshot
    assert detector.current() is not before, "degraded: current() must walk again"
    (conf / "envoy.yaml").write_text("version: 2\n")  # the rest is watched
    assert_sees(detector, conf / "envoy.yaml", "version: 2\n")
    assert _events(caplog, "watch.unwatchable") == 1, "said once, not at every rescan"


@linux_only
@pytest.mark.parametrize("case", ["name_too_long", "symlink_loop"])
def test_add_watch_errnos_make_a_directory_unwatchable(tmp_path: Path, case: str) -> None:
    from envoy_autoreload.watch.inotify import InotifyWatcher

    if case == "name_too_long":
        target = tmp_path / ("x" * 300)  # ENAMETOOLONG
    else:
        os.symlink("b", tmp_path / "a")
        os.symlink("a", tmp_path / "b")
        target = tmp_path / "a"  # ELOOP: add_watch follows symlinks
    watcher = InotifyWatcher(NoiseFilter())
    try:
        watcher.watch_directory(target, None)
        watcher.watch_directory(tmp_path, None)  # and it goes on
        unwatchable = watcher.take_unwatchable()
        assert [path for path, _why in unwatchable] == [target]
        assert watcher.watch_count == 1
        assert watcher.take_unwatchable() == []
    finally:
        watcher.close()


@pytest.mark.parametrize(
    "kind", ["inotify", "watchdog"] if sys.platform == "linux" else ["watchdog"]
)
def test_a_tree_deeper_than_the_recursion_limit_moved_in(
    tmp_path: Path, detectors: list[ChangeDetector], kind: str
) -> None:
    """A new directory is watched down to its leaves as it appears; that walk recursed
    (os.walk on 3.11) and raised RecursionError inside the loop."""
    conf = tmp_path / "conf"
    conf.mkdir()
    detector = open_detector([conf], kind)  # type: ignore[arg-type]
    detectors.append(detector)
    depth = sys.getrecursionlimit() + 100
    with deep_tree(tmp_path / "staged", depth) as staged_leaf:
        os.rename(tmp_path / "staged", conf / "staged")
        try:
            leaf = conf / staged_leaf.relative_to(tmp_path)
            assert_sees(detector, leaf, "deep: true\n")
            leaf.write_text("deep: false\n")  # watched all the way down
            assert_sees(detector, leaf, "deep: false\n")
        finally:
            remove_deep_tree(conf / "staged")  # pytest's cleanup recurses: it cannot
