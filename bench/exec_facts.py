"""Measure what survives the daemon re-executing itself (`os.execv`) while Envoy serves.

Each scenario runs a small Python "parent" that spawns the real Envoy the way
envoy_autoreload/child.py does (a start script that `exec`s Envoy, `process_group=0`,
`close_fds`, a preexec_fn setting PR_SET_PDEATHSIG=SIGTERM), waits for LIVE, then calls
`os.execv(sys.executable, [..., "-c", NEW_IMAGE, spec])`. The new image watches Envoy for
a second (reaping with `waitpid(pid, WNOHANG)`), checks admin and listener, optionally
exercises the stderr pipe and a pending SIGHUP, then TERMs Envoy, reaps it with
`waitpid(pid, 0)` and writes a JSON report. The results back docs/FACTS-reexec.md.

    .venv/bin/python bench/exec_facts.py             # all scenarios, ~30 s
    .venv/bin/python bench/exec_facts.py --repeats 5 # each Envoy scenario 5 times

Standalone like the other benches (base ids 61000-61999, ports from bench/_common.py);
every process it starts is stopped by PID and every shm segment removed, also on error.
Prints a JSON summary; writes nothing into the tree.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

from _common import CONFIG_TEMPLATE, ENVOY_BIN, environment, free_port, pick_base_id, shm_path

START_SCRIPT: Final = """\
#!/bin/sh
exec {envoy} -c {config} --restart-epoch "$RESTART_EPOCH" --base-id {base_id} \\
    --drain-time-s 1 --parent-shutdown-time-s 2 --log-level info
"""

# The daemon before the exec. argv[1] is a JSON spec (see `scenario()`).
PARENT: Final = r"""
import ctypes, http.client, json, os, signal, subprocess, sys, threading, time
spec = json.loads(sys.argv[1])
prctl = ctypes.CDLL(None, use_errno=True).prctl
me = os.getpid()
def dies_with_parent():
    prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG, as child.py's _dies_with_the_daemon
    if os.getppid() != me:
        os._exit(1)
def server_info():
    conn = http.client.HTTPConnection("127.0.0.1", spec["admin_port"], timeout=1)
    try:
        conn.request("GET", "/server_info", headers={"Connection": "close"})
        return json.loads(conn.getresponse().read())
    except Exception:
        return None
    finally:
        conn.close()
for _ in range(spec.get("sleepers", 0)):  # like the status server and health prober
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
envoy_log = open(spec["envoy_log"], "ab") if spec["stderr"] == "file" else None
box = []
def spawn():
    box.append(subprocess.Popen(
        [spec["script"]], env={**os.environ, "RESTART_EPOCH": "0"},
        stdin=subprocess.DEVNULL,
        stderr=envoy_log if envoy_log is not None else subprocess.PIPE,
        process_group=0, close_fds=True, preexec_fn=dies_with_parent))
if spec["spawn_from"] == "main":
    spawn()
else:  # a worker thread that spawns, then stays blocked until the exec ends it
    threading.Thread(target=lambda: (spawn(), time.sleep(3600)), daemon=True).start()
    while not box:
        time.sleep(0.005)
envoy = box[0]
deadline = time.monotonic() + 10
while (server_info() or {}).get("state") != "LIVE":
    if time.monotonic() > deadline or envoy.poll() is not None:
        sys.exit(f"Envoy did not go LIVE (rc {envoy.returncode})")
    time.sleep(0.01)
child_spec = dict(spec, envoy_pid=envoy.pid, stderr_fd=None)
if envoy.stderr is not None:
    fd = envoy.stderr.fileno()
    if spec["stderr"] == "pipe_inherit":
        os.set_inheritable(fd, True)
        child_spec["stderr_fd"] = fd
    # A pipe left close-on-exec is closed by the exec (nothing else holds its read end),
    # and its number may be reused in the new image: not passed on.
if spec.get("sighup_pending"):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    os.kill(me, signal.SIGHUP)
    child_spec["pending_before_exec"] = sorted(int(s) for s in signal.sigpending())
if envoy_log is not None:
    envoy_log.close()
child_spec["t_exec"] = time.clock_gettime(time.CLOCK_MONOTONIC)
child_spec["t_exec_wall"] = time.time()
argv = [sys.executable, "-c", spec["new_image"], json.dumps(child_spec)]
if spec.get("exec_from") == "thread":
    threading.Thread(target=os.execv, args=(sys.executable, argv)).start()
    time.sleep(3600)
os.execv(sys.executable, argv)
"""

# The daemon after the exec: same PID, Envoy still its child (or not).
NEW_IMAGE: Final = r"""
import time
t_first = time.clock_gettime(time.CLOCK_MONOTONIC)
import http.client, json, os, signal, sys
spec = json.loads(sys.argv[1])
if spec.get("again", 0) > 0:  # exec once more, from the new image's main thread
    spec["again"] -= 1
    os.execv(sys.executable, [sys.executable, "-c", spec["new_image"], json.dumps(spec)])
report = {"t_first_line": t_first - spec["t_exec"], "pid": os.getpid()}
report["t_exec_wall"] = spec["t_exec_wall"]
report["pending_at_start"] = sorted(int(s) for s in signal.sigpending())
report["blocked_at_start"] = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
hups = []
signal.signal(signal.SIGHUP, lambda *_: hups.append(time.monotonic()))
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
time.sleep(0.05)
report["sighup_handled"] = len(hups)
pid = spec["envoy_pid"]
def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    except Exception as err:
        return None, repr(err)
    finally:
        conn.close()
def reap_nohang():
    got, status = os.waitpid(pid, os.WNOHANG)
    return None if got == 0 else status
exited = None
watch_until = spec["t_exec"] + spec.get("watch_s", 1.0)
while time.clock_gettime(time.CLOCK_MONOTONIC) < watch_until:
    exited = reap_nohang()
    if exited is not None:
        report["died_after_exec_s"] = time.clock_gettime(time.CLOCK_MONOTONIC) - spec["t_exec"]
        report["died_status"] = exited
        report["died_exitcode"] = os.waitstatus_to_exitcode(exited)
        break
    time.sleep(0.002)
report["alive_after_watch"] = exited is None
if exited is None:
    with open(f"/proc/{pid}/stat") as f:
        report["envoy_ppid"] = int(f.read().rsplit(")", 1)[1].split()[1])
    status, body = get(spec["admin_port"], "/server_info")
    report["server_info_state"] = json.loads(body)["state"] if status == 200 else body
    report["listener"] = get(spec["listener_port"], "/")
    fd = spec.get("stderr_fd")
    if fd is not None:
        try:
            os.set_blocking(fd, False)
            drained = 0
            while True:  # what Envoy wrote before the exec is still in the pipe
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                drained += len(chunk)
            report["stderr_bytes_from_before_exec"] = drained
            report["stderr_fd_open"] = True
        except OSError as err:
            report["stderr_fd_open"] = repr(err)
            fd = None
    if spec.get("usr1"):
        for _ in range(spec["usr1"]):
            os.kill(pid, signal.SIGUSR1)
            time.sleep(0.1)
        time.sleep(0.3)
        got = b""
        if fd is not None:
            with __import__("contextlib").suppress(BlockingIOError):
                got = os.read(fd, 65536)
        report["usr1_lines_read"] = got.decode(errors="replace").count("caught SIGUSR1")
        exited = reap_nohang()
        report["alive_after_usr1"] = exited is None
        if exited is not None:
            report["usr1_exitcode"] = os.waitstatus_to_exitcode(exited)
        else:
            report["listener_after_usr1"] = get(spec["listener_port"], "/")
            report["admin_after_usr1"] = get(spec["admin_port"], "/ready")
            with open(f"/proc/{pid}/status") as f:
                report["sigpipe_ignored"] = bool(
                    int(next(l for l in f if l.startswith("SigIgn")).split()[1], 16) >> 12 & 1)
    if exited is None:
        os.kill(pid, signal.SIGTERM)
        t = time.monotonic()
        _, status = os.waitpid(pid, 0)
        report["reaped_after_term_s"] = time.monotonic() - t
        report["term_exitcode"] = os.waitstatus_to_exitcode(status)
tmp = spec["report"] + ".tmp"
with open(tmp, "w") as f:
    json.dump(report, f)
os.replace(tmp, spec["report"])
"""

# For the blind-window timing: the first line, then the daemon's CLI imported.
TIMING_IMAGE: Final = r"""
import time
t_first = time.clock_gettime(time.CLOCK_MONOTONIC)
import json, sys
import envoy_autoreload.cli
t_cli = time.clock_gettime(time.CLOCK_MONOTONIC)
t_exec = float(sys.argv[1])
with open(sys.argv[2], "w") as f:
    json.dump({"first_line": t_first - t_exec, "cli_imported": t_cli - t_exec}, f)
"""

TIMING_PARENT: Final = r"""
import os, sys, time
now = str(time.clock_gettime(time.CLOCK_MONOTONIC))
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1], now, sys.argv[2]])
"""

SCENARIOS: Final[dict[str, dict[str, Any]]] = {
    "R1 main thread spawns, main thread execs": {"spawn_from": "main"},
    "R1b main thread spawns, then three execs in a row": {"spawn_from": "main", "again": 2},
    "R2 + two sleeping daemon threads at exec": {"spawn_from": "main", "sleepers": 2},
    "R3 worker thread spawns, main thread execs": {"spawn_from": "thread"},
    "R3b main thread spawns, a worker thread execs": {"spawn_from": "main", "exec_from": "thread"},
    "R4a stderr pipe made inheritable": {
        "spawn_from": "main",
        "stderr": "pipe_inherit",
        "usr1": 3,
    },
    "R4b stderr pipe left close-on-exec": {
        "spawn_from": "main",
        "stderr": "pipe_cloexec",
        "usr1": 3,
    },
    "R5 SIGHUP blocked and pending at exec": {"spawn_from": "main", "sighup_pending": True},
}


def envoy_pids(base_id: int) -> list[int]:
    needle = f"--base-id\0{base_id}\0".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def spec_wall(report: Path) -> float:
    """The wall-clock time of the exec, as the parent passed it on."""
    value: float = json.loads(report.read_text())["t_exec_wall"]
    return value


def scenario(name: str, options: dict[str, Any], tmp: Path) -> dict[str, Any]:
    base_id = pick_base_id(61000, 61999)
    admin_port, listener_port = free_port(), free_port()
    root = Path(tempfile.mkdtemp(prefix="exec-facts-", dir=tmp))
    config = root / "envoy.yaml"
    config.write_text(
        CONFIG_TEMPLATE.format(admin_port=admin_port, listener_port=listener_port, body="v0")
    )
    script = root / "start_envoy.sh"
    script.write_text(START_SCRIPT.format(envoy=ENVOY_BIN, config=config, base_id=base_id))
    script.chmod(0o755)
    report = root / "report.json"
    spec = {
        "script": str(script),
        "admin_port": admin_port,
        "listener_port": listener_port,
        "envoy_log": str(root / "envoy.log"),
        "report": str(report),
        "stderr": "file",
        "new_image": NEW_IMAGE,
        **options,
    }
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, json.dumps(spec)], start_new_session=True
    )
    try:
        parent.wait(timeout=20)
        result: dict[str, Any] = (
            json.loads(report.read_text()) if report.exists() else {"error": "no report"}
        )
        result["parent_rc"] = parent.returncode
        result["pid_unchanged"] = result.get("pid") == parent.pid
        log = root / "envoy.log"
        if log.exists():
            text = log.read_text(errors="replace")
            result["envoy_log_sigterm"] = text.count("caught ENVOY_SIGTERM")
            if "died_after_exec_s" in result:  # when Envoy logged the parent-death signal
                line = next(x for x in text.splitlines() if "caught ENVOY_SIGTERM" in x)
                stamp = datetime.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S.%f")
                result["sigterm_logged_after_exec_s"] = stamp.timestamp() - spec_wall(report)
        return result
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in envoy_pids(base_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shm_path(base_id).unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def timing(tmp: Path, repeats: int) -> dict[str, Any]:
    first, cli = [], []
    out = tmp / "timing.json"
    for _ in range(repeats):
        subprocess.run(
            [sys.executable, "-c", TIMING_PARENT, TIMING_IMAGE, str(out)], check=True, timeout=20
        )
        sample = json.loads(out.read_text())
        first.append(sample["first_line"] * 1000)
        cli.append(sample["cli_imported"] * 1000)

    def stats(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {
            "median_ms": round(statistics.median(xs), 1),
            "min_ms": round(xs[0], 1),
            "max_ms": round(xs[-1], 1),
        }

    return {"samples": repeats, "first_line": stats(first), "cli_imported": stats(cli)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each Envoy scenario")
    parser.add_argument("--timing-repeats", type=int, default=20)
    parser.add_argument("--only", help="run only scenarios whose name contains this")
    args = parser.parse_args()
    env = environment(ENVOY_BIN)
    results: dict[str, Any] = {"environment": env}
    with tempfile.TemporaryDirectory(prefix="exec-facts-") as tmp:
        for name, options in SCENARIOS.items():
            if args.only and args.only not in name:
                continue
            runs = [scenario(name, options, Path(tmp)) for _ in range(args.repeats)]
            results[name] = runs if args.repeats > 1 else runs[0]
            print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
        if not args.only or "R6" in args.only:
            results["R6 exec to first line / cli imported"] = timing(Path(tmp), args.timing_repeats)
    results["loadavg_at_end"] = list(os.getloadavg())
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
