"""`--check` sees the hot-restart traps before a restart trips on them, each made real:
a second Envoy on our base id, another user's segment, a single-file bind mount and a
small /dev/shm (in a mount namespace of the test's own), the script's own flags."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from envoy_autoreload.traps import expand, read_script, script_base_id
from tests.daemon import run_cli
from tests.envoy.conftest import ENVOY_BIN, EnvoyFamily, MakeFamily
from tests.helpers import allocate_base_id

AS_65533 = ("setpriv", "--reuid=65533", "--regid=65533", "--clear-groups", "--")
CHECK = (sys.executable, "-m", "envoy_autoreload", "--check")


def _lines(result: subprocess.CompletedProcess[str], status: str, topic: str) -> list[str]:
    """The lines of one status and topic (`FAIL  base id  ...`)."""
    return [
        line
        for line in result.stdout.splitlines()
        if line.startswith(status) and line[6:].startswith(topic)
    ]


def _script(where: Path, config: Path, base_id: int, extra: str = "") -> Path:
    script = where / "start_other.sh"
    script.write_text(
        f'#!/bin/sh\nexec {ENVOY_BIN} -c "${{ENVOY_AUTORELOAD_SNAPSHOT:-{config}}}" '
        f'--restart-epoch "$RESTART_EPOCH" --base-id {base_id}{extra}\n'
    )
    script.chmod(0o755)
    return script


def test_a_second_family_on_a_serving_base_id_fails_and_names_the_envoy(
    make_envoy_family: MakeFamily, tmp_path_factory: pytest.TempPathFactory
) -> None:
    serving = make_envoy_family()
    daemon = serving.start()
    envoy_pid = int(daemon.wait_event("child.serving", epoch=0)["pid"])
    other = tmp_path_factory.mktemp("other")
    script = _script(other, serving.config, serving.base_id)
    clash = run_cli(["--check", "--envoy", str(ENVOY_BIN), str(script)])
    assert clash.returncode == 1, clash.stdout + clash.stderr
    (failed,) = _lines(clash, "FAIL", "base id")
    assert failed.endswith(
        f"base id {serving.base_id} is used by another Envoy (pid {envoy_pid}): pick another "
        "with --base-id in the start script (and --base-id here)"
    ), failed
    # --base-id here decides over the script's, as it does for the daemon.
    free_id = allocate_base_id()
    moved = run_cli(["--check", "--base-id", str(free_id), str(script)])
    assert not _lines(moved, "FAIL", "base id"), moved.stdout
    (differs,) = _lines(moved, "warn", "base id")
    assert differs.endswith(
        f"{script} starts Envoy with --base-id {serving.base_id} but --base-id here is "
        f"{free_id}: make them the same"
    ), differs
    # The serving family's own script: its daemon holds the base id, which is no clash.
    own = run_cli(["--check", "--envoy", str(ENVOY_BIN), str(serving.script)])
    (mine,) = _lines(own, "ok", "base id")
    assert f"is served by the running envoy-autoreload (pid {daemon.pid})" in mine, own.stdout
    daemon.stop()  # a clean stop removes the segment; a crash leaves it behind
    serving.shm.write_bytes(bytes(104))
    after = run_cli(["--check", "--envoy", str(ENVOY_BIN), str(script)])
    assert after.returncode == 0, after.stdout + after.stderr
    (leftover,) = _lines(after, "ok", "base id")
    assert f"{serving.shm} is a leftover, no live Envoy holds it" in leftover, leftover


def test_a_script_with_disable_hot_restart_fails(envoy_family: EnvoyFamily, tmp_path: Path) -> None:
    script = _script(tmp_path, envoy_family.config, envoy_family.base_id, " --disable-hot-restart")
    result = run_cli(["--check", "--config", str(envoy_family.config), str(script)])
    assert result.returncode == 1, result.stdout + result.stderr
    (failed,) = _lines(result, "FAIL", "start script")
    assert failed.endswith(
        f"{script} passes --disable-hot-restart: hot restart cannot work (each new epoch "
        "would find the ports taken); remove the flag"
    ), failed


def test_a_script_starting_another_config_warns_naming_both(
    envoy_family: EnvoyFamily, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text(envoy_family.config.read_text())
    script = _script(tmp_path, elsewhere, envoy_family.base_id)
    result = run_cli(["--check", "--config", str(envoy_family.config), str(script)])
    assert result.returncode == 0, result.stdout + result.stderr
    (warned,) = _lines(result, "warn", "start script")
    assert warned.endswith(
        f"{script} starts -c {elsewhere} but --config is {envoy_family.config}: what is "
        "validated and watched is not what Envoy starts; make them the same file"
    ), warned
    # The fixture's script names it through a variable: that is resolved, and agrees.
    same = run_cli(["--check", "--config", str(envoy_family.config), str(envoy_family.script)])
    assert f"starts -c {envoy_family.config}, the --config" in same.stdout, same.stdout


@pytest.fixture
def readable_dir() -> Iterator[Path]:
    """A directory another uid can read (pytest's own are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="traps-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.skipif(
    shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs setpriv and root"
)
def test_a_segment_of_another_user_fails_for_a_user_that_cannot_replace_it(
    readable_dir: Path,
) -> None:
    base_id = allocate_base_id()
    segment = Path(f"/dev/shm/envoy_shared_memory_{base_id * 10}")
    script = _script(readable_dir, readable_dir / "envoy.yaml", base_id)
    # The test's Envoy cannot run as that uid (its interpreter is root's); not needed here.
    args = ["--check", "--envoy", str(readable_dir / "no-envoy"), str(script)]
    try:
        segment.write_bytes(b"\0" * 104)
        os.chown(segment, 65534, 65534)
        as_user = subprocess.run(
            [*AS_65533, sys.executable, "-m", "envoy_autoreload", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        as_root = run_cli(args)
    finally:
        segment.unlink(missing_ok=True)
    assert as_user.returncode == 1, as_user.stdout + as_user.stderr
    (failed,) = _lines(as_user, "FAIL", "shm")
    assert f"shm           {segment} is owned by uid 65534" in failed, failed
    assert failed.endswith(
        "not by us (uid 65533): Envoy cannot replace it; remove it "
        f"(rm {segment}) if no Envoy of that user runs, or run as that user"
    ), failed
    assert as_root.returncode == 0, as_root.stdout + as_root.stderr  # root replaces it


def _mount_namespace_prefix() -> tuple[str, ...] | None:
    """`unshare -m` (or, unprivileged, `-r -m`): mounts made there vanish with it."""
    for prefix in (("unshare", "-m"), ("unshare", "-r", "-m")):
        probe = subprocess.run([*prefix, "true"], capture_output=True, check=False)
        if probe.returncode == 0:
            return prefix
    return None


def _check_after_mounting(mounts: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`--check` run in a mount namespace of its own after the shell `mounts`."""
    prefix = _mount_namespace_prefix()
    if prefix is None or not sys.platform.startswith("linux"):
        pytest.skip("unshare -m does not work here (no CAP_SYS_ADMIN, no user namespaces)")
    return subprocess.run(
        [*prefix, "sh", "-c", f'{mounts} && exec "$0" "$@"', *CHECK, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_single_file_bind_mount_warns_and_a_directory_mount_does_not(
    envoy_family: EnvoyFamily, tmp_path_factory: pytest.TempPathFactory
) -> None:
    host = tmp_path_factory.mktemp("host")
    (host / "envoy.yaml").write_text(envoy_family.config.read_text())
    config = envoy_family.config
    args = ("--watch", str(envoy_family.root), "--config", str(config), str(envoy_family.script))
    result = _check_after_mounting(f"mount --bind {host / 'envoy.yaml'} {config}", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    (warned,) = _lines(result, "warn", "mount")
    assert warned.endswith(
        f"{config} is a single-file bind mount (subPath/`-v file:file`): a replacement on "
        "the host is never seen; mount the directory instead"
    ), warned
    whole = _check_after_mounting(f"mount --bind {host} {envoy_family.root}", *args)
    assert not _lines(whole, "warn", "mount"), whole.stdout + whole.stderr
    assert "no single-file bind mount" in whole.stdout


def test_a_small_dev_shm_fails_and_a_nearly_full_one_warns(envoy_family: EnvoyFamily) -> None:
    script = str(envoy_family.script)
    tiny = _check_after_mounting("mount -t tmpfs -o size=8k tmpfs /dev/shm", script)
    assert tiny.returncode == 1, tiny.stdout + tiny.stderr
    (failed,) = _lines(tiny, "FAIL", "shm")
    assert "/dev/shm is full (8 KiB free of 8 KiB; Envoy needs 12 KiB)" in failed, failed
    small = _check_after_mounting("mount -t tmpfs -o size=512k tmpfs /dev/shm", script)
    assert small.returncode == 0, small.stdout + small.stderr
    (warned,) = _lines(small, "warn", "shm")
    assert "/dev/shm is nearly full (512 KiB free of 512 KiB; Envoy needs 12 KiB" in warned


def test_the_script_is_read_as_sh_would_expand_it(tmp_path: Path) -> None:
    script = tmp_path / "start.sh"
    script.write_text(
        "#!/bin/sh\n"
        'here=$(dirname "$0")\n'
        'if [ -n "$X" ]; then\n  ID=1\nelse\n  ID=2\nfi\n'
        "curl -c jar http://example/ # a -c that is not Envoy's\n"
        'exec "${ENVOY:-envoy}" -c "${ENVOY_AUTORELOAD_SNAPSHOT:-$here/envoy.yaml}" \\\n'
        '    --restart-epoch "$RESTART_EPOCH" --base-id "$ID"\n'
    )
    facts = read_script(script, environ={"ENVOY_AUTORELOAD_SNAPSHOT": "/snap"})
    assert facts is not None and facts.found
    assert facts.flag("-c") == (True, f"{tmp_path}/envoy.yaml")
    assert script_base_id(facts) is None, "ID depends on a branch: cannot tell"
    assert expand("${A:-${B:-x}}", {}) == "x"
    assert expand("${A:-x}", {"A": ""}) == "x" and expand("${A-x}", {"A": ""}) == ""
    assert expand("$(cat f)", {}) is None and expand("$UNSET", {}) is None


def test_the_daemon_logs_the_same_traps_once_at_start_up(envoy_family: EnvoyFamily) -> None:
    """A script that starts another file than --config: --check warns, and so does the
    running daemon, once, as it starts."""
    other = envoy_family.root / "elsewhere" / "envoy.yaml"
    other.parent.mkdir()
    other.write_text(envoy_family.config.read_text())
    envoy_family.write_script(snapshot=False)
    daemon = envoy_family.start("--config", str(other))
    daemon.wait_event("child.serving", epoch=0)
    traps = daemon.events("startup.trap")
    assert len(traps) == 1, traps
    assert traps[0]["level"] == "warning" and traps[0]["topic"] == "start script"
    assert str(other) in traps[0]["message"] and str(envoy_family.config) in traps[0]["message"]
