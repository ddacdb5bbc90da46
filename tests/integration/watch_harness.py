"""Drive a real ChangeDetector on real files, as the daemon's loop would."""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import time
from collections.abc import Iterator
from pathlib import Path

from envoy_autoreload.digest import WatchRoot
from envoy_autoreload.watch import WatcherKind
from envoy_autoreload.watch.changes import ChangeDetector, SettledBurst


def next_burst(detector: ChangeDetector, timeout_s: float = 15.0) -> SettledBurst | None:
    """Block (with select, like the daemon) until a burst settles or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = time.monotonic()
        if now >= deadline:
            return None
        due = detector.deadline()
        wait = deadline - now if due is None else max(0.0, min(due, deadline) - now)
        readable, _, _ = select.select([detector.fileno()], [], [], wait)
        if readable:
            detector.on_readable(time.monotonic())
        burst = detector.settle(time.monotonic())
        if burst is not None:
            return burst


def open_detector(
    roots: list[Path], kind: WatcherKind, *, quiet_s: float = 0.15, max_wait_s: float = 3.0
) -> ChangeDetector:
    """A started detector on these roots, with a short quiet window (tests' pace)."""
    detector = ChangeDetector(
        [WatchRoot(r) for r in roots],
        watcher_kind=kind,
        ignore_globs=(),
        quiet_s=quiet_s,
        max_wait_s=max_wait_s,
    )
    detector.start(degraded_ok=False)
    return detector


def assert_sees(detector: ChangeDetector, path: Path, text: str) -> SettledBurst:
    """The next burst's snapshot holds `path` with exactly `text` (hash compared)."""
    burst = next_burst(detector)
    assert burst is not None, f"no change was seen (waiting for {path})"
    expected = hashlib.sha256(text.encode()).hexdigest()
    assert burst.snapshot.files.get(str(path)) == expected, (path, burst.snapshot.files)
    return burst


def sees_eventually(
    detector: ChangeDetector, path: Path, text: str, max_bursts: int = 10
) -> SettledBurst:
    """Like `assert_sees`, over as many bursts as the change takes (a tree that appears
    one directory at a time settles once per step)."""
    expected = hashlib.sha256(text.encode()).hexdigest()
    for _burst in range(max_bursts):
        burst = next_burst(detector)
        assert burst is not None, f"no change was seen (waiting for {path})"
        if burst.snapshot.files.get(str(path)) == expected:
            return burst
    raise AssertionError(f"{max_bursts} bursts and {path} never held {text!r}")


@contextlib.contextmanager
def deep_tree(top: Path, depth: int) -> Iterator[Path]:
    """`top/d/d/.../d/leaf.yaml`, `depth` directories deep; yields the leaf's path.

    Built and removed through directory fds, one level at a time: no path handed to
    the kernel grows, and nothing recurses (pytest's own tmp_path cleanup, shutil's
    rmtree, recurses on 3.11 and would fail on it).
    """
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("leaf.yaml", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"deep: true\n")
        os.close(leaf)
    finally:
        os.close(fd)
    try:
        yield top.joinpath(*["d"] * depth, "leaf.yaml")
    finally:
        remove_deep_tree(top)


def remove_deep_tree(top: Path) -> None:
    """Remove a tree of any depth (see `deep_tree`), children before parents."""
    if not top.is_dir():
        return  # moved away by the test, which removes it where it is
    stack = [(os.open(top, os.O_RDONLY | os.O_DIRECTORY), -1, "")]
    while stack:
        fd, parent_fd, name = stack[-1]
        descended = False
        with os.scandir(fd) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    child = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                    stack.append((child, fd, entry.name))
                    descended = True
                    break
                os.unlink(entry.name, dir_fd=fd)
        if not descended:
            stack.pop()
            os.close(fd)
            if parent_fd >= 0:
                os.rmdir(name, dir_fd=parent_fd)
    top.rmdir()
