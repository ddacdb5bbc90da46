"""Which configs may be validated ahead of their burst (`check_ahead.named_files_seen`,
issue 16): only those where a change to any file they name is an inotify event. Real
inotify in temp dirs; each case also shows the event a change does (or does not) make,
so the rule is checked against what the watcher really reports."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from envoy_autoreload.check_ahead import named_files_seen
from envoy_autoreload.digest import WatchRoot
from envoy_autoreload.envoy_outputs import path_envoy_opens, paths_envoy_writes
from envoy_autoreload.references import files_envoy_reads
from envoy_autoreload.watch.changes import ChangeDetector
from tests.helpers import wait_until

FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


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


def test_dotdot_is_resolved_up_to_itself_only(tmp_path: Path) -> None:
    """kubelet's layout: `certs/tls.crt -> ..data/tls.crt`, `..data -> ..2026_01`. The
    name Envoy opens for `../certs/tls.crt` from `conf/` is `certs/tls.crt`, whose
    link is followed at each scan: not today's `..2026_01/tls.crt`, gone at the next
    rotation. After a symlink, `..` is the link target's parent."""
    conf, certs, outside = tmp_path / "conf", tmp_path / "certs", tmp_path / "outside"
    conf.mkdir()
    (certs / "..2026_01").mkdir(parents=True)
    (certs / "..2026_01" / "tls.crt").write_text("v1")
    (certs / "..data").symlink_to("..2026_01")
    (certs / "tls.crt").symlink_to("..data/tls.crt")
    assert path_envoy_opens(conf, "../certs/tls.crt") == certs / "tls.crt"
    (outside / "site").mkdir(parents=True)
    (conf / "tls").symlink_to(outside / "site")
    assert path_envoy_opens(conf, "tls/../body.txt") == outside / "body.txt"
    assert path_envoy_opens(conf, "tls/ca.pem") == conf / "tls" / "ca.pem"
    log = {"access_log": [{"typed_config": {"@type": FILE_LOG, "path": "tls/../access.log"}}]}
    assert paths_envoy_writes({"admin": log}, conf) == {outside / "access.log"}


def test_a_hard_linked_file_may_not(
    detectors: list[ChangeDetector], tree: tuple[Path, Path]
) -> None:
    """A writer through the other name changes it without an event in the tree."""
    root, outside = tree
    (outside / "ca.pem").write_text("v0")
    os.link(outside / "ca.pem", root / "ca.pem")
    allowed, _ = verdict(detectors, [root], f"{root}/ca.pem", outside / "ca.pem")
    assert not allowed


def test_a_config_with_files_envoy_watches_itself_may_not(
    detectors: list[ChangeDetector], tree: tuple[Path, Path]
) -> None:
    """An SDS secret under a `watched_directory` (outside the tree here): nothing
    watches it for us, and validation may read it."""
    root, outside = tree
    (outside / "cert.pem").write_text("v0")
    detector = ChangeDetector(
        [WatchRoot(root)], watcher_kind="inotify", ignore_globs=(), quiet_s=0.1, max_wait_s=1.0
    )
    detectors.append(detector)
    detector.start(degraded_ok=False)
    secret = {
        "watched_directory": {"path": str(outside)},
        "certificate_chain": {"filename": f"{outside}/cert.pem"},
    }
    references = files_envoy_reads({"secret": secret}, Path.cwd())
    assert references.excluded, "the secret's file is Envoy's to reload"
    assert not named_files_seen(detector, detector.current(), references)
