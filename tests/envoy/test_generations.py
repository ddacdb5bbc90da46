"""Generations against the real Envoy: every validated config is snapshotted read-only
and started byte for byte, a new one is on probation after LIVE, and one that fails it
is rolled back to the last good one; history and manual rollback through
envoy-autoreloadctl, and history that outlives the daemon."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.daemon import Daemon
from tests.envoy.conftest import ENVOY_BIN, EnvoyFamily, slow_to_initialize
from tests.helpers import free_port, http_get, pid_alive, wait_until

CTL = Path(sys.executable).parent / "envoy-autoreloadctl"
WINDOW_S = "3"  # --health-window: short, so each probation is over quickly


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _disk_sha(family: EnvoyFamily) -> str:
    return _sha(family.config.read_bytes())


def _ctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    sock = daemon.log_path.with_suffix(".sock")
    return subprocess.run(
        [str(CTL), "--control-socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _ctl_json(daemon: Daemon, *args: str) -> Any:
    result = _ctl(daemon, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _history(daemon: Daemon) -> dict[str, dict[str, Any]]:
    """`envoy-autoreloadctl history --json`, by sha256."""
    entries = _ctl_json(daemon, "history")
    assert isinstance(entries, list)
    return {entry["sha256"]: entry for entry in entries}


def _serves(family: EnvoyFamily, body: str, timeout_s: float = 30.0) -> None:
    wait_until(lambda: family.body() == body, timeout_s=timeout_s, what=f"{body!r} served")


def _render_503(family: EnvoyFamily, body: str) -> str:
    """A config that validates but whose only route answers 503."""
    text = family.render(body)
    assert text.count("status: 200") == 1
    return text.replace("status: 200", "status: 503")


def _serving_good(daemon: Daemon, family: EnvoyFamily, epoch: int = 0) -> str:
    """Wait until `epoch` serves and passed probation; its config's sha256."""
    daemon.wait_event("child.serving", epoch=epoch)
    sha = _disk_sha(family)
    daemon.wait_event("health.passed", epoch=epoch, config=sha[:12])
    return sha


def test_a_config_answering_503_is_rolled_back_by_a_newer_epoch_and_stays_on_disk(
    envoy_family: EnvoyFamily,
) -> None:
    url = f"http://127.0.0.1:{envoy_family.listener_port}/"
    daemon = envoy_family.start(
        *envoy_family.watched("--health-window", WINDOW_S, "--health-url", url)
    )
    good = _serving_good(daemon, envoy_family)
    assert envoy_family.body() == "v0"

    pushed = _render_503(envoy_family, "bad")
    envoy_family.write_raw(pushed)
    bad = _sha(pushed.encode())[:12]
    started = daemon.wait_event("child.started", config=bad)
    bad_epoch = started["epoch"]
    failed = daemon.wait_event("health.failed", config=bad)
    assert failed["check"] == "url" and failed["epoch"] == bad_epoch, failed
    rollback = daemon.wait_event("rollback.started", config=bad)
    assert rollback["to_config"] == good[:12], rollback
    finished = daemon.wait_event("rollback.finished", config=good[:12])
    assert finished["from_config"] == bad, finished
    assert finished["epoch"] > bad_epoch, (finished, bad_epoch)
    assert failed["line"] < rollback["line"] < finished["line"]
    _serves(envoy_family, "v0")
    assert envoy_family.config.read_bytes() == pushed.encode(), "the pushed file was rewritten"
    status = _ctl_json(daemon, "status")
    assert status["serving"]["epoch"] == finished["epoch"]
    assert status["serving"]["config_sha256"] == good
    assert status["last_good"]["config_sha256"] == good
    assert status["rolled_back_from"]["config_sha256"] == _sha(pushed.encode())
    assert _history(daemon)[_sha(pushed.encode())]["outcome"] == "failed"

    envoy_family.write_config("v2")
    v2 = _disk_sha(envoy_family)
    serving = daemon.wait_event(
        "child.serving", where=lambda e: e["epoch"] > finished["epoch"], timeout_s=60
    )
    _serves(envoy_family, "v2")
    daemon.wait_event("health.passed", epoch=serving["epoch"], config=v2[:12])
    assert daemon.process.poll() is None


def test_a_generation_that_dies_during_probation_fails_and_the_last_good_one_serves(
    envoy_family: EnvoyFamily,
) -> None:
    # A window long enough that the kill, 2 s after LIVE, lands inside it.
    daemon = envoy_family.start(*envoy_family.watched("--health-window", "8"))
    good = _serving_good(daemon, envoy_family)

    envoy_family.write_config("v1")
    v1 = _disk_sha(envoy_family)[:12]
    serving = daemon.wait_event("child.serving", epoch=1)
    serving_seen = time.monotonic()
    _serves(envoy_family, "v1")
    daemon.wait_event("health.probation", epoch=1, config=v1)
    # A crash under traffic: SIGKILL 2 s into its probation (deliberately not a poll:
    # the point is a generation that has served for a while, then dies).
    time.sleep(max(0.0, serving_seen + 2.0 - time.monotonic()))
    assert not daemon.events("health.passed", epoch=1), "probation ended before the kill"
    killed_at = len(daemon.lines())
    os.kill(int(serving["pid"]), signal.SIGKILL)

    failed = daemon.wait_event("health.failed", config=v1)
    assert failed["check"] == "process" and failed["epoch"] == 1, failed
    assert failed["line"] >= killed_at
    rollback = daemon.wait_event("rollback.started", config=v1)
    assert rollback["to_config"] == good[:12], rollback
    recovery = daemon.wait_event(
        "child.started", where=lambda e: e["line"] > failed["line"], timeout_s=60
    )
    assert recovery["config"] == good[:12], recovery
    # The kill lands about when epoch 0's drain ends (parent-shutdown 2 s): a respawn
    # from it can lose that race and be followed by a cold start; what serves in the end
    # is the generation `rollback.finished` names.
    finished = daemon.wait_event(
        "rollback.finished", config=good[:12], from_config=v1, timeout_s=60
    )
    _serves(envoy_family, "v0")
    assert daemon.process.poll() is None, "the daemon exited"
    assert not daemon.events("daemon.crash_budget_exhausted")
    assert _history(daemon)[_disk_sha(envoy_family)]["outcome"] == "failed"
    # Still serving v0 from a live process a moment later (no crash loop behind it).
    info = wait_until(envoy_family.server_info, timeout_s=10, what="admin answers")
    assert info["state"] == "LIVE"
    assert pid_alive(int(finished["pid"]))


def test_history_and_a_manual_rollback_to_an_older_good_generation(
    envoy_family: EnvoyFamily,
) -> None:
    daemon = envoy_family.start(*envoy_family.watched("--health-window", WINDOW_S))
    v0 = _serving_good(daemon, envoy_family)
    envoy_family.write_config("v1")
    v1 = _serving_good(daemon, envoy_family, epoch=1)
    envoy_family.write_config("v2")
    v2 = _serving_good(daemon, envoy_family, epoch=2)
    _serves(envoy_family, "v2")

    history = _history(daemon)
    for sha in (v0, v1, v2):
        assert history[sha]["outcome"] == "good", history[sha]
        assert history[sha]["short"] == sha[:12]
    assert history[v1]["epoch"] == 1 and history[v2]["epoch"] == 2
    listed = _ctl(daemon, "history")
    assert listed.returncode == 0 and v1[:12] in listed.stdout and v2[:12] in listed.stdout

    rolled = _ctl(daemon, "rollback", v1[:8])
    assert rolled.returncode == 0, rolled.stderr
    assert rolled.stdout.startswith("epoch 3:"), rolled.stdout
    assert envoy_family.body() == "v1", "served once rollback has returned"
    status = _ctl_json(daemon, "status")
    assert status["serving"]["config_sha256"] == v1
    assert status["serving"]["epoch"] == 3
    again = _ctl(daemon, "rollback", v1[:8])
    assert again.returncode == 0 and "already serving" in again.stdout, again
    assert envoy_family.config.read_bytes().decode() == envoy_family.render("v2")


def test_history_survives_a_daemon_restart_with_the_same_state_dir(
    envoy_family: EnvoyFamily,
) -> None:
    first = envoy_family.start(*envoy_family.watched("--health-window", WINDOW_S))
    state_dir = first.log_path.with_suffix(".state")
    v0 = _serving_good(first, envoy_family)
    envoy_family.write_config("v1")
    v1 = _serving_good(first, envoy_family, epoch=1)
    before = _history(first)
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0

    second = envoy_family.start(
        *envoy_family.watched("--health-window", WINDOW_S),
        env={"ENVOY_AUTORELOAD_STATE_DIR": str(state_dir)},
    )
    assert second.log_path.with_suffix(".state") != state_dir  # not the default's
    second.wait_event("child.serving", epoch=0)
    _serves(envoy_family, "v1")
    after = _history(second)
    for sha in (v0, v1):
        assert after[sha]["outcome"] == "good", after.get(sha)
        assert after[sha]["created_at"] == before[sha]["created_at"]
    # v1 passed before: started again, it is good at once (no second probation).
    assert not second.events("health.probation")
    status = _ctl_json(second, "status")
    assert status["last_good"]["config_sha256"] == v1


def test_envoy_runs_the_read_only_validated_snapshot(envoy_family: EnvoyFamily) -> None:
    daemon = envoy_family.start(*envoy_family.watched("--health-window", WINDOW_S))
    generations = (daemon.log_path.with_suffix(".state") / "generations").resolve()
    for epoch, body in ((0, "v0"), (1, "v1")):
        if epoch:
            envoy_family.write_config(body)
        serving = daemon.wait_event("child.serving", epoch=epoch)
        _serves(envoy_family, body)
        argv = Path(f"/proc/{serving['pid']}/cmdline").read_bytes().split(b"\0")
        assert Path(os.fsdecode(argv[0])).name == "envoy", argv
        config = Path(os.fsdecode(argv[argv.index(b"-c") + 1]))
        assert config.is_absolute() and config.resolve().parent == generations, config
        data = config.read_bytes()
        assert _sha(data) == config.stem, config
        assert config.suffix == ".yaml"
        assert data == envoy_family.config.read_bytes()
        assert stat.S_IMODE(config.stat().st_mode) == 0o444, oct(config.stat().st_mode)
        assert serving["pid"] == daemon.wait_event("child.started", epoch=epoch)["pid"]
        assert daemon.events("child.started", epoch=epoch)[0]["config"] == config.stem[:12]


def test_a_script_that_runs_the_snapshot_is_no_config_mismatch(
    envoy_family: EnvoyFamily,
) -> None:
    # Envoy runs -c <state>/generations/<sha>.yaml, not --config: that is no mismatch
    # (the daemon warned so at every start before 4865d16).
    daemon = envoy_family.start("--config", str(envoy_family.config), "--health-window", WINDOW_S)
    # health.probation is logged after the LIVE checks that name a mismatch.
    daemon.wait_event("health.probation", epoch=0)
    assert not daemon.events("config.mismatch"), daemon.events("config.mismatch")


def test_a_change_and_its_revert_during_validation_start_only_what_passed(
    envoy_family: EnvoyFamily,
) -> None:
    """REVIEW-core finding 8b on the real Envoy: A (broken) is pushed; while it waits to be
    validated the file becomes B (good), and right after Envoy read it, A again. Reading
    the file, the gate passed B and the daemon started A; with generations the snapshot
    of A is what is validated, so it is refused and nothing starts."""
    armed, waiting = envoy_family.root / "armed", envoy_family.root / "waiting"
    release, revert = envoy_family.root / "release", envoy_family.root / "revert.yaml"
    wrapper = envoy_family.root / "envoy-wrapper"
    wrapper.write_text(  # validation waits for the test, then puts A back on its way out
        "#!/bin/sh\n"
        f'[ "$1" = "--mode" ] && [ -e {armed} ] || exec {ENVOY_BIN} "$@"\n'
        f"touch {waiting}; while [ ! -e {release} ]; do sleep 0.05; done\n"
        f'{ENVOY_BIN} "$@"; rc=$?\n'
        f"mv {revert} {envoy_family.config}; exit $rc\n"
    )
    wrapper.chmod(0o755)
    daemon = envoy_family.start(
        "--envoy", str(wrapper), "--config", str(envoy_family.config), "--health-window", "0"
    )
    daemon.wait_event("child.serving", epoch=0)
    a = "static_resources: [not valid\n"
    revert.write_text(a)
    armed.touch()
    envoy_family.write_raw(a)
    daemon.signal(signal.SIGHUP)
    wait_until(waiting.exists, timeout_s=30, what="validation of A under way")
    envoy_family.write_config("vB")  # what Envoy reads, unless it reads a snapshot
    release.touch()
    failed = daemon.wait_event("validation.failed")
    assert failed["config"] == _sha(a.encode())[:12]
    assert envoy_family.config.read_text() == a
    assert envoy_family.body() == "v0"
    assert not [e for e in daemon.events("child.started") if e["epoch"] > 0]
    assert not daemon.events("restart.failed")


def test_a_broken_config_on_disk_at_start_up_starts_the_last_good(
    envoy_family: EnvoyFamily,
) -> None:
    """A bad push while the daemon was down: Envoy starts on the last good generation,
    and its admin (read from the snapshot, not the broken file) tells when it is LIVE."""
    first = envoy_family.start(*envoy_family.watched("--health-window", "1"))
    state_dir = first.log_path.with_suffix(".state")
    good = _serving_good(first, envoy_family)
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0
    broken = "static_resources: [not valid\n"
    envoy_family.write_raw(broken)

    second = envoy_family.start(
        *envoy_family.watched("--health-window", "1"),
        env={"ENVOY_AUTORELOAD_STATE_DIR": str(state_dir)},
    )
    instead = second.wait_event("config.invalid_at_start")
    assert instead["config"] == good[:12]
    assert second.wait_event("child.serving", epoch=0)["config"] == good[:12]
    _serves(envoy_family, "v0")
    assert not second.events("admin.unknown"), "admin was looked up in the broken file"
    assert envoy_family.config.read_text() == broken


OVERLAY = (
    "static_resources: {clusters: [{name: overlay, type: STATIC, load_assignment: "
    "{cluster_name: overlay, endpoints: [{lb_endpoints: [{endpoint: {address: "
    "{socket_address: {address: 127.0.0.1, port_value: 9}}}}]}]}}]}"
)


def test_validation_runs_with_the_serving_envoys_config_flags(envoy_family: EnvoyFamily) -> None:
    """The start script adds a cluster through --config-yaml; a push that routes to it
    is valid only with that flag, which validation takes from the running Envoy."""
    script = envoy_family.script.read_text().rstrip("\n")
    envoy_family.script.write_text(f"{script} \\\n    --config-yaml {shlex.quote(OVERLAY)}\n")
    daemon = envoy_family.start("--config", str(envoy_family.config), "--health-window", "0")
    daemon.wait_event("child.serving", epoch=0)
    root_route = '                        - match: { prefix: "/" }\n'
    text = envoy_family.render("v1")
    assert text.count(root_route) == 1
    text = text.replace(
        root_route,
        '                        - match: { prefix: "/overlay" }\n'
        "                          route: { cluster: overlay }\n" + root_route,
    )
    envoy_family.write_raw(text)
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("child.serving", epoch=1)
    _serves(envoy_family, "v1")
    assert not daemon.events("validation.failed")


def test_a_slow_next_start_does_not_fail_the_generation_on_probation(
    envoy_family: EnvoyFamily,
) -> None:
    """Epoch 1 waits for CDS from an xDS server that never answers: from ~60 ms after its
    start it answers admin, 503 PRE_INITIALIZING at epoch 1 (ENVOY_FACTS §15), while
    epoch 0, on probation, still serves. That is no failure of epoch 0's config: before,
    three such rounds (1.5 s) failed it."""
    daemon = envoy_family.start(*envoy_family.watched("--health-window", "4"))
    daemon.wait_event("health.probation", epoch=0)
    envoy_family.write_raw(slow_to_initialize(envoy_family.render("v1"), free_port()))
    daemon.wait_event("child.started", epoch=1)
    wait_until(
        lambda: http_get(envoy_family.admin_port, "/ready") == (503, "PRE_INITIALIZING\n"),
        timeout_s=20,
        what="admin answered by the initializing epoch 1",
    )
    passed = daemon.wait_event("health.passed", epoch=0, timeout_s=30)
    assert not daemon.events("health.failed"), daemon.events("health.failed")
    assert envoy_family.body() == "v0", "epoch 0 no longer serves"
    assert daemon.events("child.serving", epoch=1) == [], "epoch 1 was not slow enough"
    assert passed["line"] > daemon.wait_event("child.started", epoch=1)["line"]
