"""Watch roots whose parent directories are missing (review #7), with real files and
both backends: the tree's arrival must be seen, however many directories it takes.

Each scenario pauses longer than the quiet window between its steps (it waits for the
burst), which is what made the old watcher lose the tree: its settle rescan ran while
the parent was gone, and nothing watched the grandparent.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from envoy_autoreload.watch import WatcherKind
from envoy_autoreload.watch.changes import ChangeDetector
from tests.daemon import start_daemon
from tests.integration.watch_harness import assert_sees, next_burst, open_detector, sees_eventually

BACKENDS: list[WatcherKind] = (
    ["inotify", "watchdog"] if sys.platform.startswith("linux") else ["watchdog"]
)

Open = Callable[..., ChangeDetector]


@pytest.fixture(params=BACKENDS)
def open_watched(request: pytest.FixtureRequest) -> Iterator[Open]:
    created: list[ChangeDetector] = []

    def make(*roots: Path) -> ChangeDetector:
        detector = open_detector(list(roots), request.param)
        created.append(detector)
        return detector

    yield make
    for detector in created:
        detector.close()


def _settled(detector: ChangeDetector) -> None:
    """Wait for the burst a step caused: the next step comes after its rescan."""
    assert next_burst(detector) is not None, "the step raised no event"


def test_a_root_whose_grandparent_is_missing_is_seen_when_the_tree_appears(
    open_watched: Open, tmp_path: Path
) -> None:
    """`--watch /srv/app/conf` started before the first deploy created `/srv/app`."""
    conf = tmp_path / "x" / "app" / "conf"
    detector = open_watched(conf)
    assert detector.snapshot is not None and detector.snapshot.missing == (str(conf),)
    conf.mkdir(parents=True)
    (conf / "extra.yaml").write_text("x: 1\n")
    sees_eventually(detector, conf / "extra.yaml", "x: 1\n")
    (conf / "extra.yaml").write_text("x: 2\n")  # and the new tree is watched in full
    assert_sees(detector, conf / "extra.yaml", "x: 2\n")


def test_a_tree_that_appears_one_directory_at_a_time_is_followed_down(
    open_watched: Open, tmp_path: Path
) -> None:
    conf = tmp_path / "x" / "app" / "conf"
    detector = open_watched(conf)
    for directory in (tmp_path / "x", tmp_path / "x" / "app", conf):
        directory.mkdir()
        _settled(detector)
    (conf / "envoy.yaml").write_text("version: 1\n")
    assert_sees(detector, conf / "envoy.yaml", "version: 1\n")


def test_a_two_step_swap_of_the_parent_with_a_pause(
    open_watched: Open, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Blue/green: `mv /srv/app /srv/app.old; <pause>; mv /srv/app.new /srv/app`."""
    if "watchdog" in request.node.name:
        pytest.skip("watchdog (7.x) reports no IN_MOVE_SELF: a watched parent's rename is unseen")
    app = tmp_path / "srv" / "app"
    (app / "conf").mkdir(parents=True)
    (app / "conf" / "envoy.yaml").write_text("version: 1\n")
    staged = tmp_path / "srv" / "app.new"
    (staged / "conf").mkdir(parents=True)
    (staged / "conf" / "envoy.yaml").write_text("version: 2\n")
    config = app / "conf" / "envoy.yaml"
    detector = open_watched(app / "conf")
    os.rename(app, tmp_path / "srv" / "app.old")
    burst = next_burst(detector)
    assert burst is not None and burst.snapshot.missing == (str(app / "conf"),)
    os.rename(staged, app)
    assert_sees(detector, config, "version: 2\n")
    config.write_text("version: 3\n")  # the new tree is watched, not the old one
    assert_sees(detector, config, "version: 3\n")
    (tmp_path / "srv" / "app.old" / "conf" / "envoy.yaml").write_text("moved away\n")
    config.write_text("version: 4\n")  # positive control in the same burst window
    burst = next_burst(detector)
    assert burst is not None
    assert all("app.old" not in p for p in burst.snapshot.files)
    assert str(config) in burst.snapshot.files


def test_the_config_directory_deleted_and_created_again(open_watched: Open, tmp_path: Path) -> None:
    """`--config /etc/envoy/envoy.yaml` with the `--watch` trees elsewhere."""
    etc = tmp_path / "etc" / "envoy"
    etc.mkdir(parents=True)
    config = etc / "envoy.yaml"
    config.write_text("version: 1\n")
    detector = open_watched(config)
    shutil.rmtree(etc)
    _settled(detector)
    etc.mkdir()
    config.write_text("version: 2\n")
    sees_eventually(detector, config, "version: 2\n")


def test_a_symlink_whose_target_directory_is_missing(open_watched: Open, tmp_path: Path) -> None:
    """A hop of the chain, not the root, has the missing parent: conf/cert.pem ->
    live/cert.pem before certbot created live/."""
    conf = tmp_path / "conf"
    conf.mkdir()
    live = tmp_path / "letsencrypt" / "live"
    os.symlink(live / "cert.pem", conf / "cert.pem")
    detector = open_watched(conf)
    live.mkdir(parents=True)
    (live / "cert.pem").write_text("cert 1\n")
    sees_eventually(detector, conf / "cert.pem", "cert 1\n")
    (live / "cert.pem").write_text("cert 2\n")
    assert_sees(detector, conf / "cert.pem", "cert 2\n")


@pytest.fixture
def fake_envoy_script(tmp_path: Path) -> Path:
    """A start script whose child looks like Envoy to /proc (a `sleep` named envoy)."""
    binary = tmp_path / "bin" / "envoy"
    binary.parent.mkdir()
    shutil.copy("/bin/sleep", binary)
    script = tmp_path / "start.sh"
    script.write_text(f"#!/bin/sh\nexec {binary} 600\n")
    script.chmod(0o755)
    return script


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the daemon's default is inotify")
def test_the_daemon_restarts_for_a_tree_created_under_a_missing_parent(
    tmp_path: Path, fake_envoy_script: Path
) -> None:
    """The review's repro: `--watch $d/x/app/conf` with `$d/x` absent, then
    `mkdir -p $d/x/app/conf && echo 'x: 1' > $d/x/app/conf/extra.yaml`."""
    conf = tmp_path / "x" / "app" / "conf"
    args = ["--no-watch-binary", "--base-id", "99998", "--term-wait", "5", "--debounce", "0.2"]
    daemon = start_daemon([*args, "--watch", str(conf), str(fake_envoy_script)], tmp_path / "d.log")
    try:
        daemon.wait_event("watch.started")
        daemon.wait_event("child.serving", epoch=0)
        conf.mkdir(parents=True)
        (conf / "extra.yaml").write_text("x: 1\n")
        requested = daemon.wait_event("restart.requested", reason="files_changed")
        assert str(conf / "extra.yaml") in requested["changed"]
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit() == 0
    finally:
        daemon.stop()
