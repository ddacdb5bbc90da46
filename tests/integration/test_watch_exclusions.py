"""Files Envoy writes inside a watched tree (review #15): once excluded, an access log
that grows or is reopened neither changes the digest nor starts a burst."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from envoy_autoreload.envoy_outputs import paths_envoy_writes
from envoy_autoreload.watch import WatcherKind
from envoy_autoreload.watch.changes import ChangeDetector
from tests.integration.watch_harness import assert_sees, next_burst, open_detector

BACKENDS: list[WatcherKind] = (
    ["inotify", "watchdog"] if sys.platform.startswith("linux") else ["watchdog"]
)
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> WatcherKind:
    param: WatcherKind = request.param
    return param


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    root = tmp_path / "conf"
    (root / "logs").mkdir(parents=True)
    (root / "envoy.yaml").write_text("version: 1\n")
    return root


@pytest.fixture
def detectors() -> Iterator[list[ChangeDetector]]:
    created: list[ChangeDetector] = []
    yield created
    for detector in created:
        detector.close()


def _append(path: Path, line: str) -> None:
    with open(path, "a") as handle:  # what Envoy's flush does: IN_CLOSE_WRITE at close
        handle.write(line)


def test_an_excluded_access_log_neither_counts_nor_changes_the_digest(
    kind: WatcherKind, conf: Path, detectors: list[ChangeDetector]
) -> None:
    log = conf / "logs" / "access.log"
    bootstrap = {"access_log": [{"typed_config": {"@type": FILE_LOG, "path": "logs/access.log"}}]}
    detector = open_detector([conf], kind)
    detectors.append(detector)
    detector.exclude_paths(paths_envoy_writes(bootstrap, conf))
    before = detector.current()
    assert str(log) not in before.files
    for i in range(5):
        _append(log, f"GET /{i}\n")  # created, then appended: still nothing
    assert next_burst(detector, timeout_s=1.0) is None
    assert detector.current().digest == before.digest
    (conf / "envoy.yaml").write_text("version: 2\n")  # positive control
    burst = assert_sees(detector, conf / "envoy.yaml", "version: 2\n")
    assert str(log) not in burst.snapshot.files
    assert all(Path(p) != log for p in burst.paths)


def test_exclusion_after_start_takes_effect_at_the_next_current(
    kind: WatcherKind, conf: Path, detectors: list[ChangeDetector]
) -> None:
    """`current()` reuses the last snapshot when nothing happened; an exclusion must
    not be hidden by that shortcut."""
    log = conf / "logs" / "access.log"
    log.write_text("GET /\n")
    detector = open_detector([conf], kind)
    detectors.append(detector)
    assert detector.snapshot is not None and str(log) in detector.snapshot.files
    detector.exclude_paths([log])
    assert str(log) not in detector.current().files
    detector.exclude_paths([log])  # again: a no-op, and adding is all it does
    assert str(log) not in detector.current().files


def test_an_excluded_path_through_a_symlinked_directory(
    kind: WatcherKind, conf: Path, tmp_path: Path, detectors: list[ChangeDetector]
) -> None:
    """The config names `conf/logs/access.log`; `logs` is a link to elsewhere in the
    tree, which the walk and the watcher know by its real name."""
    real_logs = conf / "var"
    real_logs.mkdir()
    (conf / "logs").rmdir()
    (conf / "logs").symlink_to(real_logs)
    detector = open_detector([conf], kind)
    detectors.append(detector)
    detector.exclude_paths([conf / "logs" / "access.log"])
    before = detector.current()
    _append(real_logs / "access.log", "GET /\n")
    assert next_burst(detector, timeout_s=1.0) is None
    assert detector.current().digest == before.digest
    (conf / "envoy.yaml").write_text("version: 2\n")  # positive control
    assert_sees(detector, conf / "envoy.yaml", "version: 2\n")
