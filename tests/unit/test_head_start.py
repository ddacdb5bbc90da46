"""The start-up check started ahead (`head_start.py`, issue 16): its commands are
taken by the gate's check only when it would run exactly them on the same binary,
and nothing it started outlives it.

A fake `envoy` (a shell script) logs each call and answers as Envoy does; a validation
of a config that holds "slow" waits for a minute first, so a process that was
not killed is plain to see.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from envoy_autoreload.head_start import head_start
from envoy_autoreload.settings import Settings
from envoy_autoreload.validation import (
    Preflight,
    Verdict,
    commands_ahead,
    first_check,
    run_preflight_now,
)
from tests.helpers import exited, pid_alive, wait_until, write_executable

FAKE_ENVOY = """\
#!/bin/sh
echo "$$ $*" >> {calls}
case "$1" in
  --version) echo "envoy  version: 0123abcd/1.40.0/Clean/RELEASE/BoringSSL"; exit 0 ;;
  --mode)
    if grep -q slow "$4"; then sleep 60; fi
    if grep -q broken "$4"; then
      echo "error initializing configuration '$4': broken" >&2; exit 1
    fi
    sleep 0.2  # a check that takes a while: its duration is seen
    echo "configuration '$4' OK"; exit 0 ;;
esac
exit 1
"""


@pytest.fixture
def envoy(tmp_path: Path) -> Path:
    return write_executable(tmp_path / "envoy", FAKE_ENVOY.format(calls=tmp_path / "calls"))


def _calls(envoy: Path) -> list[tuple[int, str]]:
    log = envoy.parent / "calls"
    lines = log.read_text().splitlines() if log.exists() else []
    return [(int(pid), args) for pid, _, args in (line.partition(" ") for line in lines)]


def _preflight(envoy: Path, config: Path) -> Preflight:
    config.write_text(f"# {config.name}\nstatic_resources: {{}}\n")
    return Preflight(envoy, config, known_binary=None, timeout_s=120, hot_restart_version=False)


def test_the_same_check_is_taken_not_run_twice(envoy: Path, tmp_path: Path) -> None:
    """...and its duration counts from when the commands started, not from the take."""
    config = tmp_path / "a.yaml"
    ahead = _preflight(envoy, config)
    with commands_ahead(ahead):
        wait_until(lambda: len(_calls(envoy)) == 2, timeout_s=30, what="both commands ran")
        pids = [pid for pid, _ in _calls(envoy)]
        wait_until(lambda: all(map(exited, pids)), timeout_s=30, what="both commands done")
        outcome = run_preflight_now(_preflight(envoy, config))
        took_s = time.monotonic() - ahead.started_at
    assert outcome.verdict is Verdict.PASSED, outcome
    assert took_s + 0.001 >= outcome.duration_s >= 0.2  # the validation sleeps 0.2 s
    assert sorted(args for _, args in _calls(envoy)) == [
        "--mode validate -c " + str(config),
        "--version",
    ]


def test_another_config_is_validated_afresh_and_the_one_ahead_is_killed(
    envoy: Path, tmp_path: Path
) -> None:
    """A config saved between the pin ahead and the gate's pin is another snapshot,
    hence another command: the verdict must be about the new bytes."""
    slow, saved = tmp_path / "slow.yaml", tmp_path / "saved.yaml"
    with commands_ahead(_preflight(envoy, slow)):
        wait_until(lambda: len(_calls(envoy)) == 2, timeout_s=30, what="both commands ran")
        (ahead,) = [pid for pid, args in _calls(envoy) if "slow" in args]
        outcome = run_preflight_now(_preflight(envoy, saved))
        assert not pid_alive(ahead), "the validation of the old bytes was left running"
    assert outcome.verdict is Verdict.PASSED, outcome
    validated = [args for _, args in _calls(envoy) if args.startswith("--mode")]
    assert validated == [f"--mode validate -c {slow}", f"--mode validate -c {saved}"]
    assert [args for _, args in _calls(envoy)].count("--version") == 1  # that one was taken


def test_another_binary_runs_its_own_commands(envoy: Path, tmp_path: Path) -> None:
    """The binary replaced in between (its identity changed): nothing is taken."""
    config = tmp_path / "a.yaml"
    with commands_ahead(_preflight(envoy, config)):
        wait_until(lambda: len(_calls(envoy)) == 2, timeout_s=30, what="both commands ran")
        replaced = envoy.with_name("envoy.new")
        replaced.write_text(envoy.read_text() + "\n")
        replaced.chmod(0o755)
        os.replace(replaced, envoy)
        outcome = run_preflight_now(_preflight(envoy, config))
    assert outcome.verdict is Verdict.PASSED, outcome
    assert len(_calls(envoy)) == 4


def test_what_nobody_took_is_killed_on_the_way_out(envoy: Path, tmp_path: Path) -> None:
    with commands_ahead(_preflight(envoy, tmp_path / "slow.yaml")):
        wait_until(lambda: len(_calls(envoy)) == 2, timeout_s=30, what="both commands ran")
        (ahead,) = [pid for pid, args in _calls(envoy) if "slow" in args]
    assert not pid_alive(ahead)


SIGNALLED = """\
import os, signal, sys, time
from pathlib import Path
from envoy_autoreload.head_start import head_start
from envoy_autoreload.settings import Settings

root, name = Path(sys.argv[1]), sys.argv[2]
settings = Settings(
    start_script=root / "start.sh", config=root / "slow.yaml", envoy=root / "envoy",
    state_dir=root / "state",
)
with head_start(settings):
    print("ignored" if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else "caught")
    sys.stdout.flush()
    calls = root / "calls"
    deadline = time.monotonic() + 30
    while "--mode" not in (calls.read_text() if calls.exists() else ""):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(os.getpid(), getattr(signal, name))
    if name != "SIGINT":
        time.sleep(30)
print("went on")
"""


def _default_ending_signals() -> None:
    """In the child, before sh: TERM, INT and HUP as a service manager starts a daemon,
    whatever the test run inherited (under `nohup`, HUP comes ignored, and a signal
    ignored from the start is ignored by design; sh cannot undo that with `trap`)."""
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)


def _run_signalled(tmp_path: Path, name: str, *, ignore_sigint: bool = False) -> str:
    """Run SIGNALLED (with SIGINT ignored from the start, as `cmd &` in a script has
    it: `trap "" INT` before the exec); its exit code and output, as one line."""
    (tmp_path / "slow.yaml").write_text("# slow\nstatic_resources: {}\n")
    trap = 'trap "" INT; ' if ignore_sigint else ""
    script = f'{trap}exec "$0" -c "$1" "$2" "$3"'
    done = subprocess.run(
        ["sh", "-c", script, sys.executable, SIGNALLED, str(tmp_path), name],
        timeout=60,
        capture_output=True,
        text=True,
        preexec_fn=_default_ending_signals,
    )
    return f"{done.returncode} {' '.join(done.stdout.split())} {done.stderr.strip()}".strip()


@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGINT", 130), ("SIGHUP", 129)])
def test_a_signal_before_the_reactor_ends_the_daemon_and_the_check(
    envoy: Path, tmp_path: Path, name: str, code: int
) -> None:
    """TERM, INT and HUP still end a daemon that has no reactor yet, with 128 + the
    signal's number (an exit: as PID 1 a signal raised again would be ignored), no
    traceback and no click "Aborted!"; the validation started ahead, in a process
    group of its own, goes with it."""
    assert _run_signalled(tmp_path, name) == f"{code} caught"
    validations = [pid for pid, args in _calls(envoy) if args.startswith("--mode")]
    assert len(validations) == 1
    wait_until(lambda: not pid_alive(validations[0]), timeout_s=10, what="the validation gone")


def test_a_signal_the_daemon_was_started_with_ignored_stays_ignored(
    envoy: Path, tmp_path: Path
) -> None:
    """`cmd &` from a script starts it with SIGINT ignored: the check is not killed."""
    assert _run_signalled(tmp_path, "SIGINT", ignore_sigint=True) == "0 ignored went on"


START_SCRIPT = """\
#!/bin/sh
blocked=$(sed -n 's/^SigBlk:[[:space:]]*//p' /proc/$$/status)
echo "$$ $RESTART_EPOCH $ENVOY_AUTORELOAD_SNAPSHOT $blocked" >> {starts}
exec sleep 60
"""


def _family(envoy: Path, config_text: str = "static_resources: {}\n") -> Settings:
    root = envoy.parent
    (root / "envoy.yaml").write_text(config_text)
    script = write_executable(root / "start.sh", START_SCRIPT.format(starts=root / "starts"))
    return Settings(
        start_script=script, config=root / "envoy.yaml", envoy=envoy, state_dir=root / "state"
    )


def _starts(envoy: Path) -> list[list[str]]:
    log = envoy.parent / "starts"
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def _blocked() -> set[int]:
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_epoch_0_starts_its_validated_snapshot_before_the_daemon_loads(envoy: Path) -> None:
    """Once the check passed, epoch 0 is spawned at once, with the very snapshot that
    was validated; the signals the loop handles wait for it (pending, not lost) but not
    in Envoy, and an epoch 0 that no supervisor took is killed on the way out."""
    settings = _family(envoy)
    with head_start(settings) as head:
        head.spawn_epoch_0(settings)
        assert head.pinned is not None and head.spawner is not None
        (validation,) = [pid for pid, args in _calls(envoy) if args.startswith("--mode")]
        assert exited(validation), "spawned before the validation ended"
        wait_until(lambda: _starts(envoy), timeout_s=30, what="the start script ran")
        ((pid, epoch, snapshot, blocked),) = _starts(envoy)
        assert (epoch, snapshot) == ("0", str(head.pinned.path))
        assert int(blocked, 16) == 0, "Envoy would start with the daemon's signals blocked"
        assert head.spawner.started_ahead(0) and head.early is not None
        assert head.early.config == head.pinned
        assert signal.SIGTERM in _blocked() and signal.SIGCHLD in _blocked()
    assert signal.SIGTERM not in _blocked()
    assert not pid_alive(int(pid)), "an epoch 0 nobody took outlived the start-up"


def test_the_gate_takes_the_verdict_once_instead_of_checking_again(envoy: Path) -> None:
    settings = _family(envoy)
    with head_start(settings) as head:
        head.spawn_epoch_0(settings)
        assert head.pinned is not None
        calls = len(_calls(envoy))
        outcome = run_preflight_now(first_check(settings, head.pinned.path))
        assert outcome.verdict is Verdict.PASSED and len(_calls(envoy)) == calls
        again = run_preflight_now(first_check(settings, head.pinned.path))
        assert again.verdict is Verdict.PASSED and len(_calls(envoy)) == calls + 1


def test_a_config_that_fails_its_check_starts_nothing_ahead(envoy: Path) -> None:
    """The gatekeeper says why, or starts the last good generation instead."""
    settings = _family(envoy, "# broken\nstatic_resources: {}\n")
    with head_start(settings) as head:
        head.spawn_epoch_0(settings)
        assert head.spawner is None and head.early is None and not _starts(envoy)
        assert signal.SIGTERM not in _blocked() and head.pinned is not None
        outcome = run_preflight_now(first_check(settings, head.pinned.path))
        assert outcome.verdict is Verdict.FAILED, outcome
