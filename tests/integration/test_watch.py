"""Every way a config file changes, with real files and both watcher backends."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from envoy_autoreload.digest import WatchRoot
from envoy_autoreload.watch.changes import ChangeDetector, SettledBurst
from tests.integration.watch_harness import next_burst

BACKENDS = ["inotify", "watchdog"] if sys.platform.startswith("linux") else ["watchdog"]

MakeDetector = Callable[..., ChangeDetector]


@pytest.fixture(params=BACKENDS)
def make_detector(request: pytest.FixtureRequest) -> Iterator[MakeDetector]:
    created: list[ChangeDetector] = []

    def make(*roots: Path, ignore: tuple[str, ...] = ()) -> ChangeDetector:
        detector = ChangeDetector(
            [WatchRoot(r) for r in roots],
            watcher_kind=request.param,
            ignore_globs=ignore,
            quiet_s=0.15,
            max_wait_s=3.0,
        )
        detector.start(degraded_ok=False)
        created.append(detector)
        return detector

    yield make
    for detector in created:
        detector.close()


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "envoy.yaml").write_text("version: 1\n")
    return conf


def _burst(detector: ChangeDetector) -> SettledBurst:
    burst = next_burst(detector)
    assert burst is not None, "no change was seen"
    return burst


def _digest(detector: ChangeDetector) -> str:
    assert detector.snapshot is not None
    return detector.snapshot.digest


def _assert_changed_to(detector: ChangeDetector, path: Path, text: str) -> SettledBurst:
    before = detector.snapshot
    burst = _burst(detector)
    assert burst.snapshot.digest != (before.digest if before else None)
    assert str(path) in burst.snapshot.changed_since(before)
    assert path.read_text() == text
    return burst


def test_in_place_write(make_detector: MakeDetector, config_dir: Path) -> None:
    config = config_dir / "envoy.yaml"
    detector = make_detector(config_dir)
    with open(config, "w") as handle:
        handle.write("version: 2\n")
    _assert_changed_to(detector, config, "version: 2\n")


def test_in_place_write_is_seen_at_close_not_at_each_write(
    make_detector: MakeDetector, config_dir: Path, request: pytest.FixtureRequest
) -> None:
    if "watchdog" in request.node.name:
        pytest.skip("watchdog reports each write where the platform has no close event")
    config = config_dir / "envoy.yaml"
    detector = make_detector(config_dir)
    with open(config, "w") as handle:
        handle.write("version: ")
        handle.flush()
        # Longer than the quiet window: a burst now would read a half-written file.
        assert next_burst(detector, timeout_s=1.0) is None
        handle.write("2\n")
    burst = _assert_changed_to(detector, config, "version: 2\n")
    assert burst.events == 1


def test_atomic_save_by_rename_over(make_detector: MakeDetector, config_dir: Path) -> None:
    config = config_dir / "envoy.yaml"
    detector = make_detector(config_dir)
    tmp = config_dir / "envoy.yaml.tmp"  # VS Code, rsync, config pushes
    tmp.write_text("version: 2\n")
    os.replace(tmp, config)
    _assert_changed_to(detector, config, "version: 2\n")


def test_vim_style_save(make_detector: MakeDetector, config_dir: Path) -> None:
    config = config_dir / "envoy.yaml"
    detector = make_detector(config_dir)
    (config_dir / ".envoy.yaml.swp").write_text("swap")
    probe = config_dir / "4913"
    probe.write_text("")
    probe.unlink()
    backup = config_dir / "envoy.yaml~"
    os.rename(config, backup)
    config.write_text("version: 2\n")
    backup.unlink()
    burst = _assert_changed_to(detector, config, "version: 2\n")
    assert {Path(p).name for p in burst.paths} <= {"envoy.yaml"}, burst.paths


def test_emacs_style_save(make_detector: MakeDetector, config_dir: Path) -> None:
    config = config_dir / "envoy.yaml"
    detector = make_detector(config_dir)
    (config_dir / "#envoy.yaml#").write_text("autosave")
    os.symlink("user@host.1234", config_dir / ".#envoy.yaml")
    config.write_text("version: 2\n")
    burst = _assert_changed_to(detector, config, "version: 2\n")
    assert {Path(p).name for p in burst.paths} <= {"envoy.yaml"}, burst.paths


def test_sed_in_place(make_detector: MakeDetector, config_dir: Path) -> None:
    config = config_dir / "envoy.yaml"
    detector = make_detector(config_dir)
    subprocess.run(["sed", "-i", "s/1/2/", str(config)], check=True)
    _assert_changed_to(detector, config, "version: 2\n")


def test_mv_onto_the_file(make_detector: MakeDetector, config_dir: Path, tmp_path: Path) -> None:
    config = config_dir / "envoy.yaml"
    detector = make_detector(config_dir)
    elsewhere = tmp_path / "staged.yaml"
    elsewhere.write_text("version: 2\n")
    shutil.move(elsewhere, config)
    _assert_changed_to(detector, config, "version: 2\n")


def test_delete_then_recreate(make_detector: MakeDetector, config_dir: Path) -> None:
    config = config_dir / "envoy.yaml"
    detector = make_detector(config)  # a single file as the root
    config.unlink()
    burst = _burst(detector)
    assert str(config) not in burst.snapshot.files
    config.write_text("version: 2\n")
    _assert_changed_to(detector, config, "version: 2\n")


def _kubelet_update(mount: Path, stamp: str, text: str) -> None:
    """What the kubelet's atomic writer does for a ConfigMap volume."""
    payload = mount / f"..{stamp}"
    payload.mkdir()
    (payload / "envoy.yaml").write_text(text)
    old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
    os.symlink(payload.name, mount / "..data_tmp")
    os.rename(mount / "..data_tmp", mount / "..data")
    if not (mount / "envoy.yaml").is_symlink():
        os.symlink("..data/envoy.yaml", mount / "envoy.yaml")
    if old is not None:
        shutil.rmtree(mount / old)


def test_configmap_symlink_swap(make_detector: MakeDetector, tmp_path: Path) -> None:
    mount = tmp_path / "mount"
    mount.mkdir()
    _kubelet_update(mount, "2026_11_23_10_00_00.1", "version: 1\n")
    config = mount / "envoy.yaml"
    detector = make_detector(mount, config)
    assert detector.snapshot is not None and str(config) in detector.snapshot.files
    _kubelet_update(mount, "2026_11_23_10_01_00.2", "version: 2\n")
    _assert_changed_to(detector, config, "version: 2\n")
    # Watches follow the swap: the next update is seen too.
    _kubelet_update(mount, "2026_11_23_10_02_00.3", "version: 3\n")
    _assert_changed_to(detector, config, "version: 3\n")


def test_configmap_swap_with_same_content_changes_nothing(
    make_detector: MakeDetector, tmp_path: Path
) -> None:
    mount = tmp_path / "mount"
    mount.mkdir()
    _kubelet_update(mount, "2026_11_23_10_00_00.1", "version: 1\n")
    detector = make_detector(mount)
    before = _digest(detector)
    _kubelet_update(mount, "2026_11_23_10_01_00.2", "version: 1\n")
    assert _burst(detector).snapshot.digest == before
    _kubelet_update(mount, "2026_11_23_10_02_00.3", "version: 2\n")  # positive control
    assert _burst(detector).snapshot.digest != before


def test_watched_directory_removed_and_created_again(
    make_detector: MakeDetector, config_dir: Path
) -> None:
    detector = make_detector(config_dir)
    shutil.rmtree(config_dir)
    _burst(detector)
    config_dir.mkdir()
    config = config_dir / "envoy.yaml"
    config.write_text("version: 2\n")
    _assert_changed_to(detector, config, "version: 2\n")
    config.write_text("version: 3\n")  # the new directory is watched too
    _assert_changed_to(detector, config, "version: 3\n")


def test_subdirectory_created_later_is_watched(
    make_detector: MakeDetector, config_dir: Path
) -> None:
    detector = make_detector(config_dir)
    certs = config_dir / "certs" / "inner"
    certs.mkdir(parents=True)
    cert = certs / "tls.pem"
    cert.write_text("cert 1\n")
    _assert_changed_to(detector, cert, "cert 1\n")
    cert.write_text("cert 2\n")
    _assert_changed_to(detector, cert, "cert 2\n")


def test_binary_replaced_by_a_package_upgrade(make_detector: MakeDetector, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    binary = bindir / "envoy"
    binary.write_text("#!/bin/sh\necho 1.40\n")
    binary.chmod(0o755)
    detector = make_detector(binary)
    new = bindir / ".envoy.dpkg-new"
    new.write_text("#!/bin/sh\necho 1.41\n")
    new.chmod(0o755)
    os.rename(new, binary)
    _assert_changed_to(detector, binary, "#!/bin/sh\necho 1.41\n")


def test_editor_noise_and_ignored_globs_are_not_changes(
    make_detector: MakeDetector, config_dir: Path
) -> None:
    detector = make_detector(config_dir, ignore=("*.bak",))
    before = _digest(detector)
    for name in (
        ".envoy.yaml.swp",
        ".envoy.yaml.swx",
        "envoy.yaml~",
        "4913",
        "x.tmp",
        ".envoy.yaml.kate-swp",
        "#envoy.yaml#",
        "envoy.yaml.bak",
    ):
        (config_dir / name).write_text("noise")
    assert next_burst(detector, timeout_s=1.0) is None
    (config_dir / "envoy.yaml").write_text("version: 2\n")  # positive control
    burst = _burst(detector)
    assert burst.snapshot.digest != before
    assert [Path(p).name for p in burst.paths] == ["envoy.yaml"]
    assert [Path(p).name for p in burst.snapshot.files] == ["envoy.yaml"]


@pytest.mark.parametrize("action", ["touch", "same_bytes", "chmod"])
def test_unchanged_content_keeps_the_digest(
    make_detector: MakeDetector, config_dir: Path, action: str
) -> None:
    config = config_dir / "envoy.yaml"
    detector = make_detector(config_dir)
    before = _digest(detector)
    if action == "touch":
        os.utime(config)
    elif action == "same_bytes":
        config.write_text(config.read_text())
    else:
        config.chmod(0o600)
    burst = next_burst(detector, timeout_s=3.0)
    assert burst is None or burst.snapshot.digest == before
    config.write_text("version: 2\n")  # positive control: the watcher is alive
    assert _burst(detector).snapshot.digest != before


def test_kubernetes_entries_are_not_noise(config_dir: Path) -> None:
    from envoy_autoreload.watch.filters import NoiseFilter

    noise = NoiseFilter()
    assert not noise.is_noise("..data")
    assert not noise.is_noise("..2026_11_23_10_00_00.123")
    assert noise.is_noise(".envoy.yaml.swp")


def test_queue_overflow_means_rescan(tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("inotify only")
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 100_000:
        pytest.skip(f"max_queued_events is {limit}: too many files to overflow it in a test")
    conf = tmp_path / "conf"
    conf.mkdir()
    detector = ChangeDetector(
        [WatchRoot(conf)], watcher_kind="inotify", ignore_globs=(), quiet_s=0.15, max_wait_s=3
    )
    detector.start(degraded_ok=False)
    try:
        # Nobody reads while more events than the kernel queues are produced.
        for i in range(limit + 100):
            (conf / f"f{i}").touch()
        burst = _burst(detector)
        assert "<inotify queue overflow>" in burst.paths
        assert len(burst.snapshot.files) == limit + 100, "the rescan saw every file"
    finally:
        detector.close()


def test_subdirectory_replaced_by_a_rename_is_watched_anew(
    make_detector: MakeDetector, config_dir: Path, tmp_path: Path
) -> None:
    sub = config_dir / "sub"
    sub.mkdir()
    (sub / "a.yaml").write_text("a: 1\n")
    detector = make_detector(config_dir)
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "a.yaml").write_text("a: 2\n")
    os.rename(sub, tmp_path / "old")  # what an rsync --delay-updates of a tree does
    os.rename(staged, sub)
    _assert_changed_to(detector, sub / "a.yaml", "a: 2\n")
    (sub / "a.yaml").write_text("a: 3\n")  # the new inode is watched, not the old one
    _assert_changed_to(detector, sub / "a.yaml", "a: 3\n")
    (tmp_path / "old" / "a.yaml").write_text("moved away\n")
    assert next_burst(detector, timeout_s=1.0) is None, "the moved-away tree is not ours"


def test_watched_root_replaced_by_a_rename_is_watched_anew(
    make_detector: MakeDetector, config_dir: Path, tmp_path: Path
) -> None:
    detector = make_detector(config_dir)
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "envoy.yaml").write_text("version: 2\n")
    os.rename(config_dir, tmp_path / "previous")
    os.rename(staged, config_dir)
    config = config_dir / "envoy.yaml"
    _assert_changed_to(detector, config, "version: 2\n")
    config.write_text("version: 3\n")
    _assert_changed_to(detector, config, "version: 3\n")


def test_a_symlink_out_of_the_tree_is_followed(
    make_detector: MakeDetector, config_dir: Path, tmp_path: Path
) -> None:
    """certbot: conf/cert.pem -> live/cert.pem -> ../archive/cert1.pem."""
    archive, live = tmp_path / "archive", tmp_path / "live"
    archive.mkdir()
    live.mkdir()
    (archive / "cert1.pem").write_text("cert 1\n")
    os.symlink("../archive/cert1.pem", live / "cert.pem")
    os.symlink(live / "cert.pem", config_dir / "cert.pem")
    detector = make_detector(config_dir)
    (archive / "cert2.pem").write_text("cert 2\n")  # a renewal: new file, link swapped
    os.symlink("../archive/cert2.pem", live / "cert.pem.new")
    os.rename(live / "cert.pem.new", live / "cert.pem")
    _assert_changed_to(detector, config_dir / "cert.pem", "cert 2\n")
    (archive / "cert2.pem").write_text("cert 2b\n")  # the target itself is watched too
    _assert_changed_to(detector, config_dir / "cert.pem", "cert 2b\n")


def test_a_symlink_loop_is_reported_not_fatal(
    make_detector: MakeDetector, config_dir: Path
) -> None:
    os.symlink("b", config_dir / "a")
    os.symlink("a", config_dir / "b")
    detector = make_detector(config_dir)
    assert detector.snapshot is not None
    assert any("Too many levels of symbolic links" in p for p in detector.snapshot.unreadable)
    (config_dir / "envoy.yaml").write_text("version: 2\n")  # and the rest is watched
    _assert_changed_to(detector, config_dir / "envoy.yaml", "version: 2\n")


def test_a_hard_link_into_the_tree_is_seen(
    make_detector: MakeDetector, config_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "prepared.yaml"
    outside.write_text("extra: 1\n")
    detector = make_detector(config_dir)
    os.link(outside, config_dir / "extra.yaml")
    _assert_changed_to(detector, config_dir / "extra.yaml", "extra: 1\n")
