"""Envoy first (issue 16): epoch 0 does not wait for the watched files to be read, no
change made meanwhile is lost, the first restart waits for the reading to end, and a
burst that overflows inotify's queue is still one restart of the final content.

A sparse file (no disk blocks, but every byte hashed) given as the first `--watch`
root makes the reading take seconds on any machine, so "meanwhile" is a wide window
rather than a race; the family's own files are read after it.
"""

from __future__ import annotations

import signal
from pathlib import Path

from tests.envoy.conftest import ENVOY_BIN, EnvoyFamily
from tests.envoy.probe import ServingProbe
from tests.helpers import holds_for, wait_until

# Hashed at a few hundred MB/s here: seconds of reading, no disk used.
SPARSE_BYTES = 768 * 1024 * 1024


def _slow_root(family: EnvoyFamily) -> Path:
    big = family.root.parent / f"{family.root.name}-big.bin"
    with open(big, "wb") as handle:
        handle.truncate(SPARSE_BYTES)
    return big


def _serves(family: EnvoyFamily, body: str) -> None:
    wait_until(lambda: family.body() == body, timeout_s=30, what=f"{body!r} served")


def test_envoy_serves_before_the_files_are_read_and_a_sighup_waits_for_them(
    envoy_family: EnvoyFamily,
) -> None:
    big = _slow_root(envoy_family)
    daemon = envoy_family.start(
        "--watch", str(big), *envoy_family.watched(), "--log-level", "debug"
    )
    served = daemon.wait_event("child.serving", epoch=0)
    assert not daemon.events("watch.digested"), "epoch 0 waited for the files to be read"
    daemon.signal(signal.SIGHUP)
    requested = daemon.wait_event("restart.requested", reason="SIGHUP")
    digested = daemon.wait_event("watch.digested", timeout_s=60)
    started = daemon.wait_event("child.started", epoch=1, timeout_s=60)
    assert served["line"] < requested["line"] < digested["line"] < started["line"]
    assert digested["files"] >= 3, digested  # the sparse file, the config, the script
    settled = daemon.wait_event("heap.settled", timeout_s=60)
    assert settled["frozen"] > 10_000, settled  # the modules alone are tens of thousands
    assert settled["line"] > served["line"], "frozen before the files were read"
    _serves(envoy_family, "v0")


def test_a_config_saved_while_the_files_are_read_is_served(envoy_family: EnvoyFamily) -> None:
    """Epoch 0 read v0; v1 is saved before the reading reaches envoy.yaml, so the reading
    sees v1. Without the rule that a path named by an event meanwhile is UNKNOWN in
    what epoch 0 started from, v1 would look like what serves, and v0 would stay."""
    big = _slow_root(envoy_family)
    daemon = envoy_family.start(
        "--watch", str(big), *envoy_family.watched(), "--log-level", "debug"
    )
    daemon.wait_event("child.serving", epoch=0)
    _serves(envoy_family, "v0")
    assert not daemon.events("watch.digested"), "the window closed before the save"
    with ServingProbe(envoy_family.listener_port) as probe:
        envoy_family.write_config("v1")
        daemon.wait_event("watch.digested", timeout_s=60)
        daemon.wait_event("child.serving", epoch=1, timeout_s=60)
        _serves(envoy_family, "v1")
    probe.assert_never_failed()
    requested = daemon.events("restart.requested")
    assert len(requested) == 1 and str(envoy_family.config) in requested[0]["changed"]


def test_a_burst_that_overflows_the_queue_is_one_restart_of_the_final_content(
    envoy_family: EnvoyFamily,
) -> None:
    """The daemon is stopped while 10,000 files and the config change (two events a
    file: more than inotify's default 16,384 queued), so the kernel drops events and
    says so; the rescan after it restarts once, on what is there at the end."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    data = envoy_family.root / "data"
    data.mkdir()
    daemon = envoy_family.start(*envoy_family.watched())
    daemon.wait_event("child.serving", epoch=0)
    daemon.signal(signal.SIGSTOP)
    try:
        for i in range(limit // 2 + 2000):
            (data / f"f{i:05d}.json").write_text(f'{{"i": {i}}}\n')
        envoy_family.write_config("v1")
        (data / "late.json").write_text("{}\n")
    finally:
        daemon.signal(signal.SIGCONT)
    daemon.wait_event("watch.overflow", timeout_s=30)
    daemon.wait_event("child.serving", epoch=1, timeout_s=60)
    _serves(envoy_family, "v1")
    daemon.wait_event("child.exited", epoch=0, timeout_s=30)
    holds_for(
        lambda: len(daemon.events("child.started")) == 2,
        duration_s=2.0,
        what="no restart after the one the burst asked for",
    )
    assert len(daemon.events("restart.requested")) == 1


def test_a_config_saved_after_the_check_snapshotted_it_is_served(
    envoy_family: EnvoyFamily,
) -> None:
    """The start-up check snapshots and validates the config before anything is
    watched (the walk comes after epoch 0's spawn: issue 16). Here v1 is saved while
    the check runs, 1 s in (the daemon has long pinned v0 by then: a save before the
    pin is simply what epoch 0 starts), so no event can name it, and it is older than
    the spawn by more than the coarse clock's margin (the wrapper waits 0.2 s after
    saving), so its ctime does not either. The file no longer holds the snapshotted
    bytes once the walk is done, so epoch 1 serves it."""
    outside = envoy_family.root.parent / f"{envoy_family.root.name}-outside"
    outside.mkdir()
    saved = outside / "v1.yaml"
    saved.write_text(envoy_family.render("v1"))
    marker = outside / "saved"
    config = envoy_family.config
    wrapper = outside / "envoy-saving-v1"  # the real Envoy, saving v1 during the check
    wrapper.write_text(
        "#!/bin/sh\n"
        'case " $* " in *" --mode validate "*)\n'
        f"  if [ ! -e {marker} ]; then\n"
        "    sleep 1\n"
        f"    cp {saved} {config}.tmp && mv {config}.tmp {config} && : > {marker}\n"
        "    sleep 0.2\n"
        "  fi;;\n"
        "esac\n"
        f'exec {ENVOY_BIN} "$@"\n'
    )
    wrapper.chmod(0o755)
    daemon = envoy_family.start(*envoy_family.watched("--envoy", str(wrapper)))
    daemon.wait_event("child.serving", epoch=0, timeout_s=60)
    assert marker.exists(), "the wrapper did not save v1"
    daemon.wait_event("child.serving", epoch=1, timeout_s=60)
    _serves(envoy_family, "v1")
    assert not daemon.events("watch.changed_at_start"), "the pin found it, not the ctime"


def test_a_file_changed_between_the_spawn_and_the_walk_restarts_epoch_0(
    envoy_family: EnvoyFamily,
) -> None:
    """Epoch 0 is spawned before the walk (issue 16). Its start script rewrites a
    watched file as it starts; the walk reaches that file's directory last (a --watch
    tree of 20,000 directories comes first, ~0.1 s of walking), so no event can name
    the write. Its ctime, later than the spawn, does: the first reading of the files
    takes it as changed and epoch 1 starts for it, naming it."""
    tree = envoy_family.root.parent / f"{envoy_family.root.name}-tree"
    for top in range(200):
        for leaf in range(100):
            (tree / f"d{top:03d}" / f"e{leaf:02d}").mkdir(parents=True)
    late = tree / "zz" / "late.txt"  # walked last: names are walked in order
    late.parent.mkdir()
    late.write_text("as epoch 0 may have read it\n")
    marker = tree.parent / f"{tree.name}-written"  # outside anything watched
    envoy_family.write_script(
        prelude=f'[ -e {marker} ] || {{ echo "rewritten" > {late}; : > {marker}; }}\n'
    )
    daemon = envoy_family.start("--watch", str(tree), *envoy_family.watched())
    daemon.wait_event("child.serving", epoch=0, timeout_s=60)
    found = daemon.wait_event("watch.changed_at_start", timeout_s=60)
    assert found["paths"] == [str(late)], found
    requested = daemon.wait_event("restart.requested", timeout_s=60)
    assert requested["changed"] == [str(late)], requested
    daemon.wait_event("child.serving", epoch=1, timeout_s=60)
    _serves(envoy_family, "v0")
    holds_for(
        lambda: len(daemon.events("child.started")) == 2,
        duration_s=1.0,
        what="one restart for the one change",
    )


def test_epoch_0s_check_runs_once(envoy_family: EnvoyFamily) -> None:
    """The check is started before the daemon is imported (`head_start.py`) and the
    gate's start-up check takes it: Envoy validates epoch 0's config once, not twice."""
    calls = envoy_family.root.parent / f"{envoy_family.root.name}-calls"
    wrapper = envoy_family.root.parent / f"{envoy_family.root.name}-envoy-logging"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {ENVOY_BIN} "$@"\n')
    wrapper.chmod(0o755)
    daemon = envoy_family.start(*envoy_family.watched("--envoy", str(wrapper)))
    daemon.wait_event("child.serving", epoch=0, timeout_s=60)
    _serves(envoy_family, "v0")
    commands = [line for line in calls.read_text().splitlines() if "--restart-epoch" not in line]
    assert sorted(line.split()[0] for line in commands) == ["--mode", "--version"], commands


def test_a_sigterm_while_the_daemon_loads_stops_epoch_0_the_usual_way(
    envoy_family: EnvoyFamily,
) -> None:
    """Epoch 0 is spawned once its config validated, before the daemon has loaded the
    rest of itself (head_start.py). Its start script here sends SIGTERM to the daemon
    first: the signal waits for the loop (neither lost nor the end of a daemon that
    would leave Envoy behind), which stops Envoy as always, and the shared memory with
    it."""
    wrapper = envoy_family.root.parent / f"{envoy_family.root.name}-terminating.sh"
    wrapper.write_text(f'#!/bin/sh\nkill -TERM "$PPID"\nexec {envoy_family.script} "$@"\n')
    wrapper.chmod(0o755)
    daemon = envoy_family.start_script(wrapper, *envoy_family.watched())
    assert daemon.wait_exit() == 0
    started = daemon.wait_event("child.started", epoch=0)
    stopping = daemon.wait_event("shutdown.started")
    assert started["line"] < stopping["line"], "the spawn came after the signal"
    daemon.wait_event("shutdown.finished", exit_code=0)
    assert not envoy_family.our_processes()
    assert not envoy_family.shm.exists()
