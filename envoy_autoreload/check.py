"""`envoy-autoreload --check`: say what a run with these options would do, start nothing.

For an operator before a rollout (and for CI of a config repository): the same checks
the daemon makes at start-up, each reported on one line as ok, warn or FAIL, and an
exit status of 0 when all is well and 1 when something would fail. Warnings (a start
script we cannot prove passes the epoch on, a missing watch path, a state directory the
daemon could not use) do not fail: the daemon runs on with them, only with less. The
hot-restart traps (traps.py: another Envoy on the base id, /dev/shm, single-file bind
mounts, `--disable-hot-restart`, a `-c` other than --config) are the daemon's too.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from envoy_autoreload.envoy_config import admin_address_from_config, load_bootstrap
from envoy_autoreload.errors import AutoreloadError, ConfigError
from envoy_autoreload.limits import check_limits
from envoy_autoreload.references import References, files_envoy_reads, relative_names_trap
from envoy_autoreload.settings import Settings
from envoy_autoreload.settings import check_config as settings_check_config
from envoy_autoreload.settings import check_start_script as settings_check_start_script
from envoy_autoreload.traps import startup_traps
from envoy_autoreload.validation import BinaryInfo, Preflight, at_start_up, run_preflight_now
from envoy_autoreload.watch.changes import ChangeDetector

_EPOCH_FLAG = re.compile(r"--restart-epoch[ =]+\"?\$\{?RESTART_EPOCH")
SNAPSHOT_VARIABLE = "ENVOY_AUTORELOAD_SNAPSHOT"
_GENERATIONS_OFF = "generations are off: no config history, exact start or rollback"


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Finding:
    status: Status
    topic: str
    text: str


def check_start_script(script: Path) -> list[Finding]:
    try:
        settings_check_start_script(script)
    except AutoreloadError as err:
        return [Finding(Status.FAIL, "start script", str(err))]
    try:
        text = script.read_text(errors="replace")[:1_000_000]
    except OSError as err:
        return [Finding(Status.WARN, "start script", f"cannot read {script}: {err.strerror}")]
    findings = []
    if _EPOCH_FLAG.search(text):
        findings.append(
            Finding(Status.OK, "start script", f'{script} passes --restart-epoch "$RESTART_EPOCH"')
        )
    else:
        findings.append(
            Finding(
                Status.WARN,
                "start script",
                f'{script} does not visibly pass --restart-epoch "$RESTART_EPOCH": every '
                "hot restart would start a second epoch 0, which Envoy refuses",
            )
        )
    if "--use-dynamic-base-id" in text and "--base-id-path" not in text:
        findings.append(
            Finding(
                Status.WARN,
                "start script",
                "--use-dynamic-base-id without --base-id-path: later epochs cannot learn the "
                "base id, and Envoy refuses --restart-epoch > 0 with a dynamic one",
            )
        )
    if not re.search(r"^\s*exec\s", text, re.MULTILINE):
        findings.append(
            Finding(
                Status.WARN,
                "start script",
                "no `exec`: Envoy would run as the shell's child and signals reach the shell",
            )
        )
    return findings


def check_snapshot_use(settings: Settings) -> list[Finding]:
    """Whether the script starts the snapshot the daemon validated, or the file on disk.

    A script that ignores the variable still runs (drop-in), so this is a warning; but
    then a write after validation reaches Envoy unvalidated and rollback cannot take
    effect. Only with --config (without it nothing is snapshotted); an unreadable script
    is reported by check_start_script already.
    """
    if settings.config is None:
        return []
    script = settings.start_script
    try:
        text = script.read_text(errors="replace")[:1_000_000]
    except OSError:
        return []
    if SNAPSHOT_VARIABLE in text:
        return [
            Finding(
                Status.OK,
                "start script",
                f"{script} starts the validated snapshot (${SNAPSHOT_VARIABLE})",
            )
        ]
    return [
        Finding(
            Status.WARN,
            "start script",
            f"{script} does not use ${SNAPSHOT_VARIABLE}: Envoy starts what is on disk, not "
            "the snapshot that was validated, so the exact-start guarantee and rollback are "
            f'off; write -c "${{{SNAPSHOT_VARIABLE}:-{settings.config}}}"',
        )
    ]


def _lock_holder(state_dir: Path) -> str:
    """Who the lock file names, read only: a running daemon holds the lock, and --check
    must neither take it nor wait for it."""
    try:
        pid_text = (state_dir / "lock").read_text(errors="replace")[:64].strip()
    except OSError:
        return ""
    if not pid_text.isdigit():
        return ""
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"; its lock names PID {pid}, which is not running"
    except PermissionError:
        pass  # exists, as another user
    return f"; its lock names PID {pid}, which is running (a daemon uses it)"


def _state_dir_problem(state_dir: Path) -> str | None:
    """Why the daemon could not keep generations in state_dir, or None if it could.

    Asked without creating anything: an existing directory must be writable, a missing
    one must be creatable under its deepest existing ancestor.
    """
    if state_dir.exists():
        if not state_dir.is_dir():
            return "not a directory"
        if not os.access(state_dir, os.W_OK | os.X_OK):
            return "not writable"
        return None
    ancestor = state_dir.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot be created: {ancestor} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot be created: {ancestor} is not writable"
    return None


def check_state_dir(settings: Settings) -> list[Finding]:
    """Whether config generations can be kept, without creating or locking anything.

    A daemon may be running on this very directory and holding its lock; and a state
    directory that cannot be used only turns generations off, so it is a warning.
    """
    state_dir = settings.state_dir
    if settings.config is None:
        return [Finding(Status.OK, "state", "no --config: no config generations to keep")]
    if state_dir is None:
        return [
            Finding(
                Status.WARN,
                "state",
                f"no state directory: {_GENERATIONS_OFF}; give --state-dir DIR",
            )
        ]
    problem = _state_dir_problem(state_dir)
    if problem is not None:
        return [
            Finding(
                Status.WARN,
                "state",
                f"{state_dir}: {problem}: {_GENERATIONS_OFF}; give --state-dir DIR",
            )
        ]
    if not state_dir.exists():
        return [Finding(Status.OK, "state", f"{state_dir}: will be created for generations")]
    return [
        Finding(
            Status.OK, "state", f"{state_dir}: generations are kept here{_lock_holder(state_dir)}"
        )
    ]


def check_binary(settings: Settings) -> tuple[list[Finding], BinaryInfo | None]:
    needed = settings.validate and settings.config is not None
    if settings.envoy is None:
        status = Status.FAIL if needed else Status.WARN
        return [Finding(status, "envoy", "no Envoy binary found (give --envoy PATH)")], None
    outcome = run_preflight_now(
        Preflight(settings.envoy, None, known_binary=None, timeout_s=settings.validate_timeout_s)
    )
    if not outcome.ok or outcome.binary is None:
        return [Finding(Status.FAIL, "envoy", at_start_up(outcome.message))], None
    binary = outcome.binary
    return [
        Finding(
            Status.OK,
            "envoy",
            f"{binary.path}: version {binary.release}, hot-restart version "
            f"{binary.hot_restart_version}",
        )
    ], binary


def check_config(settings: Settings, binary: BinaryInfo | None) -> list[Finding]:
    config = settings.config
    if config is None:
        return [
            Finding(Status.WARN, "config", "no --config: nothing is validated before a restart")
        ]
    findings: list[Finding] = []
    try:
        settings_check_config(config)
    except AutoreloadError as err:
        return [Finding(Status.FAIL, "config", str(err))]
    try:
        admin = admin_address_from_config(config)
    except AutoreloadError as err:
        admin = None
        findings.append(Finding(Status.WARN, "config", str(err)))
    if settings.admin_address is not None or admin is not None:
        where = settings.admin_address or admin
        findings.append(Finding(Status.OK, "admin", f"LIVE is asked of {where}/server_info"))
    else:
        findings.append(
            Finding(Status.WARN, "admin", "no admin address: LIVE is judged by shared memory")
        )
    if not settings.validate:
        findings.append(Finding(Status.WARN, "config", f"{config}: not validated (--no-validate)"))
        return findings
    if settings.envoy is None or binary is None:
        findings.append(Finding(Status.FAIL, "config", f"{config}: cannot validate without Envoy"))
        return findings
    outcome = run_preflight_now(
        Preflight(
            settings.envoy, config, known_binary=binary, timeout_s=settings.validate_timeout_s
        )
    )
    if outcome.ok:
        findings.append(
            Finding(Status.OK, "config", f"{config} validates ({outcome.duration_s:.2f} s)")
        )
    else:
        findings.append(Finding(Status.FAIL, "config", f"{config}: {outcome.message}"))
    return findings


_TRAP_STATUS = {"info": Status.OK, "warning": Status.WARN, "error": Status.FAIL}


def check_traps(settings: Settings) -> list[Finding]:
    """The hot-restart traps (traps.py), which the daemon's start-up asks too: another
    Envoy on the base id, /dev/shm, single-file bind mounts, the script's flags."""
    return [
        Finding(_TRAP_STATUS[trap.level], trap.topic, trap.message)
        for trap in startup_traps(settings)
    ]


def check_referenced(settings: Settings, changes: ChangeDetector | None) -> list[Finding]:
    """The files the config names that are watched too, and those left out and why
    (references.py); the watch counts below include them."""
    if changes is None or settings.config is None or not settings.watch_referenced:
        return []
    refs = _references_of(settings.config)
    if refs is None:
        return []
    changes.watch_referenced(refs.reads)
    findings = [
        Finding(Status.OK, "referenced", f"{path}: watched too (Envoy reads it at start)")
        for path in sorted(refs.reads)
    ]
    findings += [
        Finding(Status.OK, "referenced", f"{path}: left out: {why}") for path, why in refs.excluded
    ]
    return findings


def check_relative_names(settings: Settings) -> list[Finding]:
    """Relative file names in the config: validated and watched from the daemon's
    working directory, read by Envoy from its own. --check cannot know Envoy's (a `cd`
    in the start script moves it); the running daemon says so once it can (LIVE)."""
    refs = _references_of(settings.config) if settings.config is not None else None
    if refs is None or not refs.relative:
        return []
    return [Finding(Status.WARN, "config", relative_names_trap(refs.relative, Path.cwd(), None))]


def _references_of(config: Path) -> References | None:
    """The files `config` names, from here; None when it cannot be parsed (the config
    line says what is wrong with it) or is no mapping."""
    try:
        document = load_bootstrap(config)
    except ConfigError:
        return None
    return files_envoy_reads(document, Path.cwd()) if isinstance(document, Mapping) else None


def check_watching(settings: Settings, changes: ChangeDetector | None) -> list[Finding]:
    if changes is None:
        return [Finding(Status.OK, "watch", "no --watch: restarts only on SIGHUP (drop-in mode)")]
    snapshot = changes.plan()
    findings = [
        Finding(
            Status.OK,
            "watch",
            f"paths: {len(changes.roots)}, directories: {len(snapshot.directories)}, files: "
            f"{snapshot.file_count}, inotify watches: {snapshot.watch_points} "
            f"({settings.watcher} watcher)",
        )
    ]
    findings += [
        Finding(Status.WARN, "watch", f"{path} does not exist (yet)") for path in snapshot.missing
    ]
    if snapshot.unreadable:
        shown = ", ".join(snapshot.unreadable[:5])
        more = f" and {len(snapshot.unreadable) - 5} more" if len(snapshot.unreadable) > 5 else ""
        findings.append(
            Finding(Status.WARN, "watch", f"permission denied, not watched: {shown}{more}")
        )
    for check in check_limits(snapshot.watch_points):
        findings.append(
            Finding(Status.OK, "inotify", check.describe())
            if check.ok
            else Finding(
                Status.WARN if settings.watch_degraded else Status.FAIL, "inotify", check.advice()
            )
        )
    return findings


def run_check(
    settings: Settings, changes: ChangeDetector | None, emit: Callable[[str], None]
) -> int:
    """Print the findings; 0 when nothing would fail, 1 otherwise."""
    findings = check_start_script(settings.start_script)
    findings += check_snapshot_use(settings)
    findings += check_traps(settings)
    binary_findings, binary = check_binary(settings)
    findings += binary_findings
    findings += check_config(settings, binary)
    findings += check_relative_names(settings)
    findings += check_state_dir(settings)
    findings += check_referenced(settings, changes)
    findings += check_watching(settings, changes)
    width = max(len(f.topic) for f in findings)
    for finding in findings:
        emit(f"{finding.status.value:<4}  {finding.topic:<{width}}  {finding.text}")
    failed = sum(1 for f in findings if f.status is Status.FAIL)
    warned = sum(1 for f in findings if f.status is Status.WARN)
    emit(f"verdict: {'would fail' if failed else 'ok'} ({failed} failing, {warned} warnings)")
    return 1 if failed else 0
