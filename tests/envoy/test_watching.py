"""The daemon with --watch against the real Envoy: content changes restart, noise does not."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.envoy.conftest import EnvoyFamily
from tests.helpers import wait_until


def test_a_500_file_burst_with_one_config_edit_is_exactly_one_restart(
    envoy_family: EnvoyFamily,
) -> None:
    data = envoy_family.root / "data"
    data.mkdir()
    daemon = envoy_family.start(*envoy_family.watched())
    daemon.wait_event("child.serving", epoch=0)
    for i in range(250):
        (data / f"route-{i}.json").write_text(f'{{"n": {i}}}')
    envoy_family.write_config("v1")
    for i in range(250, 500):
        (data / f"route-{i}.json").write_text(f'{{"n": {i}}}')
    requested = daemon.wait_event("restart.requested", reason="files_changed")
    assert requested["count"] == 501
    daemon.wait_event("child.serving", epoch=1)
    assert envoy_family.body() == "v1"
    daemon.wait_event("child.exited", epoch=0)  # well past any second debounce window
    assert len(daemon.events("child.started")) == 2
    assert len(daemon.events("restart.requested")) == 1


def test_unchanged_content_does_not_restart(envoy_family: EnvoyFamily) -> None:
    daemon = envoy_family.start(*envoy_family.watched("--log-level", "debug"))
    daemon.wait_event("child.serving", epoch=0)
    os.utime(envoy_family.config)
    daemon.wait_event("restart.skipped", reason="unchanged")
    envoy_family.config.write_bytes(envoy_family.config.read_bytes())
    daemon.wait_event("restart.skipped", reason="unchanged", count=2)
    (envoy_family.root / ".envoy.yaml.swp").write_text("vim swap")
    envoy_family.write_config("v1")  # positive control: the watcher is alive
    requested = daemon.wait_event("restart.requested", reason="files_changed")
    assert [Path(p).name for p in requested["changed"]] == ["envoy.yaml"]
    daemon.wait_event("child.serving", epoch=1)
    assert len(daemon.events("child.started")) == 2


def test_sighup_is_not_delayed_by_the_debounce(envoy_family: EnvoyFamily) -> None:
    daemon = envoy_family.start(*envoy_family.watched("--debounce", "60", "--debounce-max", "60"))
    daemon.wait_event("child.serving", epoch=0)
    envoy_family.write_config("v1")
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("child.serving", epoch=1, timeout_s=20)
    assert envoy_family.body() == "v1"


def test_without_watch_nothing_is_watched(envoy_family: EnvoyFamily) -> None:
    daemon = envoy_family.start("--config", str(envoy_family.config))
    daemon.wait_event("child.serving", epoch=0)
    assert not daemon.events("watch.started")
    envoy_family.write_config("v1")
    daemon.signal(signal.SIGHUP)  # positive control: the same daemon restarts on request
    daemon.wait_event("child.serving", epoch=1)
    assert len(daemon.events("restart.requested")) == 1


def test_configmap_update_restarts_onto_the_new_content(
    envoy_family: EnvoyFamily, tmp_path: Path
) -> None:
    mount = tmp_path / "configmap"
    mount.mkdir()

    def update(stamp: str, body: str) -> None:
        envoy_family.write_config(body)
        payload = mount / f"..{stamp}"
        payload.mkdir()
        os.replace(envoy_family.config, payload / "envoy.yaml")
        old = os.readlink(mount / "..data") if (mount / "..data").is_symlink() else None
        os.symlink(payload.name, mount / "..data_tmp")
        os.rename(mount / "..data_tmp", mount / "..data")
        if not (mount / "envoy.yaml").is_symlink():
            os.symlink("..data/envoy.yaml", mount / "envoy.yaml")
        if old is not None:
            for f in (mount / old).iterdir():
                f.unlink()
            (mount / old).rmdir()

    update("2026_11_23_00_00_00.1", "v0")
    envoy_family.script.write_text(
        envoy_family.script.read_text().replace(str(envoy_family.config), str(mount / "envoy.yaml"))
    )
    daemon = envoy_family.start("--watch", str(mount), "--config", str(mount / "envoy.yaml"))
    daemon.wait_event("child.serving", epoch=0)
    update("2026_11_23_00_01_00.2", "v1")
    daemon.wait_event("child.serving", epoch=1)
    wait_until(lambda: envoy_family.body() == "v1", timeout_s=10, what="v1 served")
