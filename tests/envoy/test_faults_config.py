"""Fault matrix, bad config on disk: each row pushes a real mistake at a real Envoy while a
client asks every 100 ms, and checks that nobody saw an error and the log said why.

The rows are the README's "What happens when" table; keep the two in step.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon import Daemon, assert_one_clear_line
from tests.envoy.breakages import BREAKAGES, break_yaml
from tests.envoy.conftest import EnvoyFamily, MakeFamily
from tests.envoy.probe import ServingProbe, serves_after_drain
from tests.helpers import holds_for, port_held

DEBOUNCE = ("--debounce", "0.3")


def nothing_started_since(daemon: Daemon, epoch: int) -> Callable[[], bool]:
    return lambda: not daemon.events("child.started", epoch=epoch)


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_config_refused_by_validation_never_reaches_a_restart(
    envoy_family: EnvoyFamily, breakage: str
) -> None:
    transform, envoy_says = BREAKAGES[breakage]
    daemon = envoy_family.start(*envoy_family.watched())
    serving = daemon.wait_event("child.serving", epoch=0)
    with ServingProbe(envoy_family.listener_port) as probe:
        envoy_family.write_raw(transform(envoy_family.config.read_text()))
        failed = daemon.wait_event("validation.failed")
        assert_one_clear_line(failed, envoy_says, "epoch 0 keeps serving")
        assert "[critical]" in failed["output"], "Envoy's whole output follows the line"
        daemon.signal(signal.SIGHUP)  # an operator's explicit request is gated the same way
        daemon.wait_event("validation.failed", count=2)
        assert nothing_started_since(daemon, 1)()
        envoy_family.write_config("v1")  # the fix restarts
        serves_after_drain(daemon, probe, "v1", epoch=1)
    probe.assert_never_failed()
    assert set(probe.bodies()) == {"v0", "v1"}
    assert len(daemon.events("validation.failed")) == 2
    assert [e["pid"] for e in daemon.events("child.draining")] == [serving["pid"]]


@pytest.mark.parametrize("writer", ["closes_between", "holds_it_open"])
def test_a_config_written_in_two_parts_restarts_once_on_the_whole_file(
    envoy_family: EnvoyFamily, writer: str
) -> None:
    """A slow writer (scp, a config push writing in place) pauses longer than the debounce
    in the middle of the file: the half is refused (or never tried), the whole starts."""
    daemon = envoy_family.start(*envoy_family.watched(*DEBOUNCE))
    daemon.wait_event("child.serving", epoch=0)
    whole = envoy_family.render("v1")
    cut = whole.index("route_config:") + 8  # mid-key: the half is not valid YAML
    with ServingProbe(envoy_family.listener_port) as probe:
        if writer == "closes_between":
            envoy_family.config.write_text(whole[:cut])
            failed = daemon.wait_event("validation.failed")
            assert_one_clear_line(failed, "epoch 0 keeps serving")
            with envoy_family.config.open("a") as rest:
                rest.write(whole[cut:])
        else:
            with envoy_family.config.open("w") as handle:
                handle.write(whole[:cut])
                handle.flush()
                # Longer than the debounce: an open file is not a finished change.
                holds_for(nothing_started_since(daemon, 1), duration_s=1.0, what="no restart yet")
                handle.write(whole[cut:])
            assert not daemon.events("validation.failed"), "the half was never tried"
        serves_after_drain(daemon, probe, "v1", epoch=1)
    probe.assert_never_failed()
    assert len(daemon.events("child.started", epoch=1)) == 1, "the whole file, once"


@pytest.mark.parametrize("config_option", ["given", "from_envoys_command_line"])
def test_a_deleted_config_restarts_nothing_until_it_is_back(
    envoy_family: EnvoyFamily, config_option: str
) -> None:
    args = ["--watch", str(envoy_family.root), *DEBOUNCE, "--log-level", "debug"]
    if config_option == "given":
        args += ["--config", str(envoy_family.config)]
    daemon = envoy_family.start(*args)
    daemon.wait_event("child.serving", epoch=0)
    original = envoy_family.config.read_text()
    with ServingProbe(envoy_family.listener_port) as probe:
        envoy_family.config.unlink()
        missing = daemon.wait_event("watch.missing")
        assert_one_clear_line(missing, str(envoy_family.config), "epoch 0 keeps serving")
        assert missing["level"] == "warning"
        (envoy_family.root / "other.txt").write_text("another change while it is missing\n")
        holds_for(
            lambda: (
                nothing_started_since(daemon, 1)()
                and not daemon.events("watch.restored")
                and len(daemon.events("watch.missing")) == 1
            ),
            duration_s=1.5,
            what="no restart, and no second word about the same loss",
        )
        # The same bytes back (a push that deletes before it copies): nothing to do.
        (envoy_family.root / "other.txt").unlink()
        envoy_family.write_raw(original)
        restored = daemon.wait_event("watch.restored")
        skipped = daemon.wait_event("restart.skipped", reason="unchanged")
        assert restored["line"] < skipped["line"]
        assert not daemon.events("restart.requested"), "neither the loss nor the return"
        envoy_family.write_config("v1")
        serves_after_drain(daemon, probe, "v1", epoch=1)  # probed until the old epoch is gone
    probe.assert_never_failed()
    assert not daemon.events("validation.failed"), "a missing file is not a broken config"
    assert not daemon.events("restart.failed")
    assert len(daemon.events("child.started", epoch=1)) == 1


def test_a_config_deleted_while_a_restart_waits_is_held_not_refused(
    envoy_family: EnvoyFamily,
) -> None:
    daemon = envoy_family.start(*envoy_family.watched(*DEBOUNCE))
    daemon.wait_event("child.serving", epoch=0)
    with ServingProbe(envoy_family.listener_port) as probe:
        envoy_family.write_config("v1")
        daemon.wait_event("child.serving", epoch=1)
        envoy_family.write_config("v2")  # validated, then waits for epoch 0's drain
        daemon.wait_event("restart.waiting", epoch=0)
        envoy_family.config.unlink()
        missing = daemon.wait_event("watch.missing")
        assert_one_clear_line(missing, str(envoy_family.config), "epoch 1 keeps serving")
        daemon.wait_event("child.exited", epoch=0)
        holds_for(nothing_started_since(daemon, 2), duration_s=1.0, what="no restart")
        envoy_family.write_config("v2")
        serves_after_drain(daemon, probe, "v2", epoch=2)
    probe.assert_never_failed()
    assert not daemon.events("validation.failed")
    assert len(daemon.events("child.started", epoch=2)) == 1


def test_a_deleted_watched_directory_restarts_once_when_it_is_created_again(
    make_envoy_family: MakeFamily,
) -> None:
    family = make_envoy_family(config_name="conf/envoy.yaml")
    daemon = family.start(*family.watched(*DEBOUNCE))
    daemon.wait_event("child.serving", epoch=0)
    with ServingProbe(family.listener_port) as probe:
        shutil.rmtree(family.config.parent)
        missing = daemon.wait_event("watch.missing")
        assert_one_clear_line(missing, str(family.config))
        holds_for(nothing_started_since(daemon, 1), duration_s=1.0, what="no restart")
        family.config.parent.mkdir()
        family.write_config("v1")
        daemon.wait_event("child.serving", epoch=1)
        probe.wait_for_body("v1")
        # Watched anew: the next edit in the re-created directory is seen too.
        family.write_config("v2")
        serves_after_drain(daemon, probe, "v2", epoch=2)
    probe.assert_never_failed()
    assert not daemon.events("validation.failed")
    assert len(daemon.events("child.started", epoch=1)) == 1


def test_a_port_held_by_another_process_fails_the_new_epoch_not_the_old(
    envoy_family: EnvoyFamily,
) -> None:
    daemon = envoy_family.start(*envoy_family.watched(*DEBOUNCE))
    old = daemon.wait_event("child.serving", epoch=0)
    with port_held() as held_port, ServingProbe(envoy_family.listener_port) as probe:
        # Validation cannot see this (ENVOY_FACTS §1): only the child finds the port taken.
        envoy_family.write_config("v1", extra_listener_port=held_port)
        passed = daemon.wait_event("validation.passed", count=2)  # the first was at start-up
        failed = daemon.wait_event("restart.failed", epoch=1)
        assert passed["line"] < failed["line"]
        assert_one_clear_line(failed, "Address already in use", "epoch 0 keeps serving")
        assert "Address already in use" in failed["output"]
        # The fix is pushed while the port is still held: it does not need that port.
        envoy_family.write_config("v2")
        new = daemon.wait_event("child.serving", epoch=1)
        probe.wait_for_body("v2")
        daemon.wait_event("child.exited", epoch=0)
    probe.assert_never_failed()
    assert set(probe.bodies()) == {"v0", "v2"}
    assert new["pid"] != old["pid"]
    # The stuck INITIALIZING flag was cleared before the next attempt could be refused.
    cleared = daemon.events("hot_restart.flag_cleared", epoch=1)
    assert cleared and cleared[0]["line"] < new["line"]
    # Every attempt used epoch 1: a failed start never consumes an epoch.
    assert {e["epoch"] for e in daemon.events("child.started")} == {0, 1}


def test_symlinks_out_of_the_tree_and_symlink_loops_neither_hang_nor_crash(
    envoy_family: EnvoyFamily, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "cert.pem").write_text("cert 1\n")
    root = envoy_family.root
    (root / "cert.pem").symlink_to(outside / "cert.pem")  # certbot's live/ -> archive/
    (root / "self").symlink_to("self")  # ELOOP
    (root / "ping").symlink_to("pong")
    (root / "pong").symlink_to("ping")
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to("..")  # a directory cycle
    (root / "sub" / "root").symlink_to(root)
    daemon = envoy_family.start(*envoy_family.watched(*DEBOUNCE))
    daemon.wait_event("child.serving", epoch=0)
    loops = daemon.wait_event("watch.unreadable")
    assert loops["level"] == "warning" and loops["count"] == 3
    assert "Too many levels of symbolic links" in " ".join(loops["paths"])
    with ServingProbe(envoy_family.listener_port) as probe:
        (outside / "cert.pem").write_text("cert 2\n")  # a renewal outside the tree
        daemon.wait_event("child.serving", epoch=1)
        envoy_family.write_config("v1")
        serves_after_drain(daemon, probe, "v1", epoch=2)
    probe.assert_never_failed()
    assert daemon.process.poll() is None


def test_a_config_path_with_spaces_and_non_ascii_characters_works(
    make_envoy_family: MakeFamily,
) -> None:
    family = make_envoy_family(config_name="conf dir ü/envoy é 設定.yaml")
    daemon = family.start(*family.watched(*DEBOUNCE))
    daemon.wait_event("child.serving", epoch=0)
    with ServingProbe(family.listener_port) as probe:
        family.write_raw(break_yaml(family.config.read_text()))
        failed = daemon.wait_event("validation.failed")
        assert_one_clear_line(failed, str(family.config))
        family.write_config("v1")
        serves_after_drain(daemon, probe, "v1", epoch=1)
    probe.assert_never_failed()
    started = daemon.wait_event("watch.started")
    assert started["roots"][0] == str(family.config.parent)
    # Envoy runs the validated snapshot of that file (named by its hash, not its path).
    assert b".state/generations/" in _cmdline_of(daemon, epoch=1)


def _cmdline_of(daemon: Daemon, epoch: int) -> bytes:
    pid = daemon.events("child.serving", epoch=epoch)[-1]["pid"]
    return Path(f"/proc/{pid}/cmdline").read_bytes()
