"""The daemon re-executing itself (`os.execv`) while its Envoy serves: docs/FACTS-reexec.md.

Each test runs a small Python "daemon" that spawns the real Envoy as
envoy_autoreload/child.py does (the family's start script, which `exec`s Envoy;
`process_group=0`, `close_fds`, a preexec_fn setting PR_SET_PDEATHSIG=SIGTERM), waits for
LIVE and then execs the interpreter into NEW_IMAGE. The new image, under the same PID,
watches Envoy for a second, checks admin and listener, TERMs it, reaps it with
`os.waitpid(pid, 0)` and writes a JSON report. Envoy's stderr goes to a file (R4 uses a
pipe), so its log shows whether it caught a parent-death SIGTERM.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

import pytest

from tests.envoy.conftest import EnvoyFamily
from tests.helpers import wait_until

# The daemon before the exec; argv[1] is the JSON spec built by `exec_daemon`.
PARENT = r"""
import ctypes, http.client, json, os, signal, subprocess, sys, threading, time
spec = json.loads(sys.argv[1])
prctl = ctypes.CDLL(None, use_errno=True).prctl
me = os.getpid()
def dies_with_the_daemon():  # as envoy_autoreload/child.py's _dies_with_the_daemon
    prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != me:
        os._exit(1)
def state():
    conn = http.client.HTTPConnection("127.0.0.1", spec["admin_port"], timeout=1)
    try:
        conn.request("GET", "/server_info", headers={"Connection": "close"})
        return json.loads(conn.getresponse().read())["state"]
    except Exception:
        return None
    finally:
        conn.close()
for _ in range(spec["sleepers"]):  # like the status server and health prober threads
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
log = open(spec["envoy_log"], "ab")
env = {**os.environ, "RESTART_EPOCH": "0"}
env.pop("ENVOY_AUTORELOAD_SNAPSHOT", None)
box = []
def spawn():
    box.append(subprocess.Popen(
        [spec["script"]], env=env, stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE if spec["stderr_pipe"] else log,
        process_group=0, close_fds=True, preexec_fn=dies_with_the_daemon))
if spec["spawn_from"] == "main":
    spawn()
else:  # a worker thread spawns, then stays blocked until the exec ends it
    threading.Thread(target=lambda: (spawn(), time.sleep(3600)), daemon=True).start()
    while not box:
        time.sleep(0.005)
envoy = box[0]
deadline = time.monotonic() + 8
while state() != "LIVE":
    if time.monotonic() > deadline or envoy.poll() is not None:
        sys.exit(f"Envoy did not go LIVE (rc {envoy.returncode})")
    time.sleep(0.01)
spec["envoy_pid"] = envoy.pid
if envoy.stderr is not None:
    os.set_inheritable(envoy.stderr.fileno(), True)
    spec["stderr_fd"] = envoy.stderr.fileno()
if spec["sighup_pending"]:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    os.kill(me, signal.SIGHUP)
log.close()
os.execv(sys.executable, [sys.executable, "-c", spec["new_image"], json.dumps(spec)])
"""

# The daemon after the exec.
NEW_IMAGE = r"""
import http.client, json, os, signal, sys, time
spec = json.loads(sys.argv[1])
report = {"pid": os.getpid()}
report["pending_at_start"] = sorted(int(s) for s in signal.sigpending())
report["blocked_at_start"] = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
hups = []
signal.signal(signal.SIGHUP, lambda *_: hups.append(1))
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
time.sleep(0.05)
report["sighup_handled"] = len(hups)
pid = spec["envoy_pid"]
def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return [response.status, response.read().decode(errors="replace")]
    except Exception as err:
        return [None, repr(err)]
    finally:
        conn.close()
deadline = time.monotonic() + 1.0  # a parent-death SIGTERM ends Envoy in ~10 ms
while time.monotonic() < deadline:
    got, status = os.waitpid(pid, os.WNOHANG)
    if got:
        report["died_exitcode"] = os.waitstatus_to_exitcode(status)
        break
    time.sleep(0.005)
else:
    with open(f"/proc/{pid}/stat") as f:
        report["envoy_ppid"] = int(f.read().rsplit(")", 1)[1].split()[1])
    status, body = get(spec["admin_port"], "/server_info")
    report["state"] = json.loads(body)["state"] if status == 200 else body
    report["listener"] = get(spec["listener_port"], "/")
    fd = spec.get("stderr_fd")
    if fd is not None:
        os.set_blocking(fd, True)
        os.kill(pid, signal.SIGUSR1)
        text = b""
        while b"caught SIGUSR1" not in text:  # the test's deadline bounds this
            text += os.read(fd, 65536)
        report["read_usr1_line"] = True
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    report["term_exitcode"] = os.waitstatus_to_exitcode(status)
tmp = spec["report"] + ".tmp"
with open(tmp, "w") as f:
    json.dump(report, f)
os.replace(tmp, spec["report"])
"""


def exec_daemon(
    family: EnvoyFamily,
    *,
    spawn_from: str = "main",
    sleepers: int = 0,
    sighup_pending: bool = False,
    stderr_pipe: bool = False,
) -> tuple[dict[str, Any], int, str]:
    """Run PARENT then NEW_IMAGE; return the report, the daemon's PID and Envoy's log."""
    report = family.root / "exec-report.json"
    envoy_log = family.root / "envoy.log"
    spec = {
        "script": str(family.script),
        "admin_port": family.admin_port,
        "listener_port": family.listener_port,
        "spawn_from": spawn_from,
        "sleepers": sleepers,
        "sighup_pending": sighup_pending,
        "stderr_pipe": stderr_pipe,
        "envoy_log": str(envoy_log),
        "report": str(report),
        "new_image": NEW_IMAGE,
    }
    daemon = subprocess.Popen([sys.executable, "-c", PARENT, json.dumps(spec)])
    try:
        wait_until(
            lambda: report.exists() or daemon.poll() is not None,
            timeout_s=10,
            what="the re-executed daemon's report",
        )
        assert daemon.wait(timeout=5) == 0
        result: dict[str, Any] = json.loads(report.read_text())
        return result, daemon.pid, envoy_log.read_text(errors="replace")
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


@pytest.mark.parametrize("sleepers", [0, 2], ids=["no-other-threads", "two-sleeping-threads"])
def test_r1_r2_envoy_spawned_from_the_main_thread_survives_exec_and_is_reaped_after(
    envoy_family: EnvoyFamily, sleepers: int
) -> None:
    report, daemon_pid, envoy_log = exec_daemon(envoy_family, sleepers=sleepers)
    assert report["pid"] == daemon_pid  # exec keeps the PID
    assert "died_exitcode" not in report, f"Envoy died across the exec: {envoy_log[-2000:]}"
    assert report["envoy_ppid"] == daemon_pid  # still our child, so ours to reap
    assert report["state"] == "LIVE"
    assert report["listener"] == [200, "v0"]
    assert report["term_exitcode"] == 0  # reaped by the new image with waitpid(pid, 0)
    assert envoy_log.count("caught ENVOY_SIGTERM") == 1  # only the new image's TERM
    assert report["pending_at_start"] == [] and report["sighup_handled"] == 0


def test_r3_envoy_spawned_from_a_worker_thread_gets_sigterm_at_exec(
    envoy_family: EnvoyFamily,
) -> None:
    """exec ends every other thread; the spawning one was Envoy's parent for
    PR_SET_PDEATHSIG, so Envoy is TERMed and exits 0, still reapable by the new image."""
    report, daemon_pid, envoy_log = exec_daemon(envoy_family, spawn_from="thread")
    assert report["pid"] == daemon_pid
    assert report.get("died_exitcode") == 0, report
    assert "caught ENVOY_SIGTERM" in envoy_log


def test_r4_an_inheritable_stderr_pipe_is_read_by_the_new_image(
    envoy_family: EnvoyFamily,
) -> None:
    report, _, _ = exec_daemon(envoy_family, stderr_pipe=True)
    assert report.get("read_usr1_line") is True, report
    assert report["term_exitcode"] == 0


def test_r5_a_blocked_pending_sighup_survives_exec_and_is_handled_once(
    envoy_family: EnvoyFamily,
) -> None:
    report, _, _ = exec_daemon(envoy_family, sighup_pending=True)
    assert report["pending_at_start"] == [signal.SIGHUP]
    assert report["blocked_at_start"] == [signal.SIGHUP]
    assert report["sighup_handled"] == 1
    assert report["state"] == "LIVE"  # and Envoy did not notice
    assert report["term_exitcode"] == 0
