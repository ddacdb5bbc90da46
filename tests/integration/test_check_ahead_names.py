"""Which configs may be validated ahead of their burst (`check_ahead.named_files_seen`,
issue 16): only those where a change to any file they name is an inotify event. Real
inotify in temp dirs; each case also shows the event a change does (or does not) make,
so the rule is checked against what the watcher really reports."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from envoy_autoreload.check_ahead import named_files_seen
from envoy_autoreload.digest import WatchRoot
from envoy_autoreload.references import files_envoy_reads
from envoy_autoreload.watch.changes import ChangeDetector
from tests.helpers import wait_until


@pytest.fixture
def detectors() -> Iterator[list[ChangeDetector]]:
    made: list[ChangeDetector] = []
    yield made
    for detector in made:
        detector.close()


def verdict(
    made: list[ChangeDetector],
    roots: list[Path],
    named: str,
    real: Path,
    *,
    ignore: tuple[str, ...] = (),
    exclude: tuple[Path, ...] = (),
) -> tuple[bool, bool]:
    """(may run ahead, a change to what Envoy reads is an event)."""
    detector = ChangeDetector(
        [WatchRoot(r) for r in roots],
        watcher_kind="inotify",
        ignore_globs=ignore,
        quiet_s=0.1,
        max_wait_s=1.0,
    )
    made.append(detector)
    detector.exclude_paths(exclude)
    detector.start(degraded_ok=False)
    content = detector.current()
    references = files_envoy_reads({"body": {"filename": named}}, Path.cwd())
    allowed = named_files_seen(detector, content, references)
    before = detector.events_total
    real.write_text(f"changed at {time.monotonic()}")
    seen = (
        wait_until(
            lambda: detector.on_readable(time.monotonic()) > 0 or None,
            timeout_s=0.5,
            what="the change's event",
        )
        if allowed
        else None
    )
    return allowed, bool(seen) or detector.events_total > before


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "watch", tmp_path / "outside"
    root.mkdir()
    (outside / "site").mkdir(parents=True)
    return root, outside


def test_a_plain_file_in_the_tree_may(
    detectors: list[ChangeDetector], tree: tuple[Path, Path]
) -> None:
    root, _ = tree
    (root / "body.txt").write_text("v0")
    assert verdict(detectors, [root], f"{root}/body.txt", root / "body.txt") == (True, True)


def test_dotdot_after_a_symlink_names_the_file_beside_its_target(
    detectors: list[ChangeDetector], tree: tuple[Path, Path]
) -> None:
    """`tls/../body.txt` with `tls` a link out of the tree is `outside/body.txt`."""
    root, outside = tree
    (root / "tls").symlink_to(outside / "site")
    (root / "body.txt").write_text("a decoy: not what Envoy opens")
    (outside / "body.txt").write_text("v0")
    allowed, _ = verdict(detectors, [root], f"{root}/tls/../body.txt", outside / "body.txt")
    assert not allowed


def test_an_ignored_name_may_not(detectors: list[ChangeDetector], tree: tuple[Path, Path]) -> None:
    root, _ = tree
    (root / "body.txt").write_text("v0")
    allowed, _ = verdict(
        detectors, [root], f"{root}/body.txt", root / "body.txt", ignore=("body.*",)
    )
    assert not allowed


def test_an_excluded_file_may_not(detectors: list[ChangeDetector], tree: tuple[Path, Path]) -> None:
    """Excluded by an earlier config (an old access log the new one reads)."""
    root, _ = tree
    (root / "old.log").write_text("v0")
    allowed, _ = verdict(
        detectors, [root], f"{root}/old.log", root / "old.log", exclude=(root / "old.log",)
    )
    assert not allowed


def test_a_file_root_with_an_ignored_name_may_not(
    detectors: list[ChangeDetector], tree: tuple[Path, Path]
) -> None:
    """A named file outside the tree is its own root once a config naming it passed; it
    is hashed whatever its name, but the watcher drops events for an ignored one."""
    root, outside = tree
    cert = outside / "cert.pem"
    cert.write_text("v0")
    allowed, _ = verdict(detectors, [root, cert], str(cert), cert, ignore=("*.pem",))
    assert not allowed


def test_a_file_outside_every_root_may_not(
    detectors: list[ChangeDetector], tree: tuple[Path, Path]
) -> None:
    root, outside = tree
    (outside / "body.txt").write_text("v0")
    allowed, _ = verdict(detectors, [root], f"{outside}/body.txt", outside / "body.txt")
    assert not allowed


def test_a_file_behind_a_link_the_walk_does_not_follow_may_not(
    detectors: list[ChangeDetector], tree: tuple[Path, Path]
) -> None:
    """A symlinked directory that leads to a directory containing the tree is not
    walked (nor watched): a file named through it changes without an event."""
    root, _ = tree
    (root / "up").symlink_to(root.parent)
    (root.parent / "body.txt").write_text("v0")
    allowed, _ = verdict(detectors, [root], f"{root}/up/body.txt", root.parent / "body.txt")
    assert not allowed
