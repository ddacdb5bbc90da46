"""The hot-restart traps: setups that start fine once and then break the first restart.

Each of these is invisible until Envoy fails at the worst moment (a hot restart, or a
cold start after a crash), yet each can be seen beforehand from the start script's
text, /proc and /dev/shm. Both `--check` and the daemon's start-up ask them here, so
one function per trap returns findings and none of them starts, writes or locks
anything. `startup_traps(settings)` runs them all.

Levels: `error` (the next start or hot restart will fail), `warning` (it works, but not
as the operator thinks), `info` (checked, fine: `--check` prints it as ok; the daemon
may leave it out of its log).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from envoy_autoreload.envoy_process import executable_of, looks_like_envoy, parse_envoy_argv
from envoy_autoreload.hot_restart_shm import KNOWN_LAYOUTS, SHM_DIR, shm_path
from envoy_autoreload.settings import Settings

Level = Literal["info", "warning", "error"]
SNAPSHOT_VARIABLE: Final = "ENVOY_AUTORELOAD_SNAPSHOT"
_SCRIPT_LIMIT: Final = 1_000_000
_PUNCTUATION: Final = frozenset("();<>|&")
# The most Envoy processes of one family alive at once (ENVOY_FACTS §0: the domain
# sockets go modulo 3); the space check asks room for that many segments.
FAMILY_PROCESSES: Final = 3
# Free space /dev/shm should keep beyond the segments: below it another program filling
# /dev/shm (browsers, databases, Python's multiprocessing) takes Envoy's next segment.
SHM_HEADROOM: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class Trap:
    """One finding: `message` is one line saying what is wrong and what to do."""

    level: Level
    topic: str
    message: str


# --- The start script, read as text ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScriptFacts:
    """What the start script's text says about the Envoy it starts.

    Read, never run: a script may do anything. Values are expanded from the script's
    own plain assignments and the environment it inherits; a value that needs more (a
    command substitution, a variable assigned twice) is None: "cannot tell".
    `$ENVOY_AUTORELOAD_SNAPSHOT` counts as unset, so its default is what the script
    starts from the file on disk.
    """

    found: bool = False  # an Envoy command line was recognised
    envoy_words: tuple[str, ...] = ()
    variables: Mapping[str, str | None] = field(default_factory=dict)
    disables_hot_restart: bool = False

    def flag(self, *names: str) -> tuple[bool, str | None]:
        """(given, expanded value) for a value flag of the Envoy command line."""
        raw = _flag_value(self.envoy_words, names)
        if raw is None:
            return False, None
        return True, expand(raw, self.variables)


def _commands(text: str) -> Iterator[list[str]]:
    """Simple commands (words), split at newlines, `;`, `&&`, `|` and the like.

    Lines are joined until the quotes balance, so a multi-line quoted value stays one
    word; a line that never balances (within 64 KiB) is dropped.
    """
    buffer = ""
    for line in text.replace("\\\n", " ").splitlines():
        buffer += line + "\n"
        try:
            lexer = shlex.shlex(buffer, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words = list(lexer)
        except ValueError:
            if len(buffer) > 65536:
                buffer = ""
            continue
        buffer = ""
        command: list[str] = []
        for word in words:
            if word and set(word) <= _PUNCTUATION:
                yield command
                command = []
            else:
                command.append(word)
        yield command


_PARAMETER = re.compile(r"\$\{(\w+)(?:(:?[-=])((?:[^{}]|\{[^{}]*\})*))?\}|\$(\w+)")


def expand(word: str, variables: Mapping[str, str | None]) -> str | None:
    """`$X`, `${X}`, `${X:-default}` (and `-`, `:=`, `=`) as sh would, or None when the
    value cannot be known from here (unknown variable, `$(...)`, other expansions)."""
    if "`" in word or "$(" in word:
        return None
    unknown = False

    def substitute(match: re.Match[str]) -> str:
        nonlocal unknown
        name = match.group(1) or match.group(4)
        operator, default = match.group(2), match.group(3)
        if name in variables and variables[name] is None:
            unknown = True  # assigned, but to something we cannot know
            return ""
        value = variables.get(name)
        use_default = operator is not None and (
            value is None or (operator.startswith(":") and value == "")
        )
        if use_default:
            expanded = expand(default, variables)
            unknown = unknown or expanded is None
            return expanded or ""
        if value is None:
            unknown = True
            return ""
        return value

    result = _PARAMETER.sub(substitute, word)
    return None if unknown or "$" in result else result


def _flag_value(words: tuple[str, ...], names: tuple[str, ...]) -> str | None:
    """The value of the last of `names` given as `--flag value` or `--flag=value`."""
    value = None
    for i, word in enumerate(words):
        name, eq, inline = word.partition("=")
        if eq and name in names:
            value = inline
        elif word in names and i + 1 < len(words):
            value = words[i + 1]
    return value


_ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(.*)$", re.DOTALL)
_DECLARATIONS: Final = frozenset({"export", "readonly", "local", "declare"})


_OPENERS: Final = frozenset({"if", "case", "for", "while", "until"})
_CLOSERS: Final = frozenset({"fi", "esac", "done"})
_CONTINUERS: Final = frozenset({"then", "else", "do"})


@dataclass(slots=True)
class _Assignments:
    """Plain assignments as the script makes them, in order. Inside an `if`, `case` or
    loop a branch may or may not run, so a name given two different values there becomes
    unknown; at the top level the later one simply wins (`PATH=/opt/bin:$PATH`)."""

    variables: dict[str, str | None]
    depth: int = 0

    def take(self, command: list[str]) -> list[str]:
        """Record what `command` assigns; the words left to run (none if only assigned)."""
        while command and command[0] in _OPENERS | _CLOSERS | _CONTINUERS:
            self.depth += (command[0] in _OPENERS) - (command[0] in _CLOSERS)
            self.depth = max(self.depth, 0)
            command = command[1:]
        declared = bool(command) and command[0] in _DECLARATIONS
        words = [w for w in command[1:] if "=" in w] if declared else command
        matches = [_ASSIGNMENT.match(word) for word in words]
        if (not declared and not words) or any(m is None for m in matches):
            return command
        for match in matches:
            assert match is not None
            name, value = match.group(1), expand(match.group(2), self.variables)
            if self.depth and name in self.variables and self.variables[name] != value:
                value = None
            self.variables[name] = value
        return []


def _envoy_start(command: list[str], variables: Mapping[str, str | None]) -> int | None:
    """Where Envoy's own words begin in `command`, or None if it does not start Envoy:
    a word naming an `envoy*` binary, else the command that passes `--restart-epoch`
    (which only Envoy takes: `su -c`, `curl -c` must not pass for Envoy's `-c`)."""
    for i, word in enumerate(command):
        value = expand(word, variables) or word
        name = os.path.basename(value)
        if name.startswith("envoy") and not name.startswith("envoy-autoreload"):
            return i + 1
    if _passes_epoch(command):
        return 0
    return None


_SCRIPT_DIR: Final = "_envoy_autoreload_script_dir"
_DIRNAME_OF_0: Final = re.compile(r'\$\(\s*dirname\s+(?:"\$\{?0\}?"|\$\{?0\}?)\s*\)')


def command_line_outputs(script: Path) -> list[Path]:
    """Files Envoy writes that its command line names (`--admin-address-path`,
    `--base-id-path`, read from the start script's text): each epoch writes them as it
    starts, so inside a watched tree they would restart it again and again."""
    facts = read_script(script)
    if facts is None:
        return []
    found = []
    for flag in ("--admin-address-path", "--base-id-path"):
        given, value = facts.flag(flag)
        if given and value:
            found.append(Path(os.path.abspath(value)))
    return found


def read_script(script: Path, environ: Mapping[str, str] | None = None) -> ScriptFacts | None:
    """The facts of the script's text, or None when it cannot be read."""
    try:
        text = script.read_text(errors="replace")[:_SCRIPT_LIMIT]
    except OSError:
        return None
    env = os.environ if environ is None else environ
    assignments = _Assignments({k: v for k, v in env.items() if k != SNAPSHOT_VARIABLE})
    # `here=$(dirname "$0")`, the usual way to find files beside the script: the daemon
    # runs the script by its absolute path, so that is its directory.
    assignments.variables["0"] = str(script)
    assignments.variables[_SCRIPT_DIR] = os.path.dirname(script)
    text = _DIRNAME_OF_0.sub("${" + _SCRIPT_DIR + "}", text)
    envoy_words: tuple[str, ...] | None = None
    disables = False
    for command in _commands(text):
        disables = disables or any("--disable-hot-restart" in word for word in command)
        rest = assignments.take(command)
        start = _envoy_start(rest, assignments.variables)
        if start is not None and (envoy_words is None or _passes_epoch(rest)):
            envoy_words = tuple(rest[start:])
    return ScriptFacts(
        envoy_words is not None, envoy_words or (), dict(assignments.variables), disables
    )


def _passes_epoch(words: list[str]) -> bool:
    """Only Envoy takes --restart-epoch: the surest sign a command starts it."""
    return any(w == "--restart-epoch" or w.startswith("--restart-epoch=") for w in words)


def script_base_id(facts: ScriptFacts) -> int | None:
    """The base id the script's Envoy uses: its `--base-id`, Envoy's default 0 when it
    gives none, None when it is dynamic or not a plain number we can read."""
    if not facts.found:
        return None
    given, value = facts.flag("--base-id")
    if not given:
        return None if "--use-dynamic-base-id" in facts.envoy_words else 0
    return int(value) if value is not None and value.isdigit() else None


# --- Trap 5, 6: the script against the daemon's options -------------------------------


def hot_restart_disabled(script: Path, facts: ScriptFacts) -> list[Trap]:
    """`--disable-hot-restart` makes every restart a second, unrelated Envoy that finds
    the ports taken: the one thing this daemon does cannot work."""
    if not facts.disables_hot_restart:
        return []
    return [
        Trap(
            "error",
            "start script",
            f"{script} passes --disable-hot-restart: hot restart cannot work (each new "
            "epoch would find the ports taken); remove the flag",
        )
    ]


def config_mismatch(settings: Settings, facts: ScriptFacts) -> list[Trap]:
    """The daemon validates, watches and snapshots `--config`; if the script's `-c`
    names another file, what Envoy starts after a hot restart was never looked at."""
    if settings.config is None or not facts.found:
        return []
    given, value = facts.flag("-c", "--config-path")
    script = settings.start_script
    if not given:
        return []
    if value is None:
        return [Trap("info", "start script", f"{script}: cannot tell which -c it starts")]
    if os.path.realpath(value) == os.path.realpath(settings.config):
        return [Trap("info", "start script", f"{script} starts -c {value}, the --config")]
    return [
        Trap(
            "warning",
            "start script",
            f"{script} starts -c {value} but --config is {settings.config}: what is "
            "validated and watched is not what Envoy starts; make them the same file",
        )
    ]


def base_id_mismatch(settings: Settings, facts: ScriptFacts) -> list[Trap]:
    """`--base-id` here names the shared memory the daemon reads and repairs: if the
    script starts Envoy on another one, the daemon looks at the wrong segment."""
    script_id = script_base_id(facts)
    if settings.base_id is None or script_id is None or script_id == settings.base_id:
        return []
    return [
        Trap(
            "warning",
            "base id",
            f"{settings.start_script} starts Envoy with --base-id {script_id} but --base-id "
            f"here is {settings.base_id}: make them the same",
        )
    ]


# --- Trap 1: another family on our base id --------------------------------------------


def _argv(pid: int) -> list[str]:
    """A process's argv; empty when it is gone, a kernel thread, or not ours to read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _parent(pid: int) -> int:
    """The parent PID from /proc/PID/stat (after the last `)`: the name may hold one)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _ancestors(pid: int) -> list[int]:
    """Parents up to init: who started an Envoy decides whether its base id is ours.
    Bounded, since a PID reused mid-walk could in theory loop."""
    chain: list[int] = []
    while pid > 1 and len(chain) < 64:
        pid = _parent(pid)
        chain.append(pid)
    return chain


def _shares_network(pid: int) -> bool:
    """Envoy's hot-restart sockets are abstract, one set per network namespace: an
    Envoy in another container's namespace cannot collide. Unknown counts as shared."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
    except OSError:
        return True


# Envoy runs that hold no base id: validation, version questions, hot restart off.
_NOT_SERVING: Final = frozenset(
    {"validate", "--mode=validate", "--version", "--hot-restart-version", "--help"}
    | {"--disable-hot-restart"}
)


def envoys_on_base_id(base_id: int) -> list[int]:
    """Live hot-restartable Envoys using `base_id` (no validate-mode run, none with hot
    restart disabled), outside this process's own descendants and network namespace."""
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    ours = os.getpid()
    for entry in entries:
        if not entry.isdigit() or int(entry) == ours:
            continue
        pid = int(entry)
        argv = _argv(pid)
        if not argv or (base_id != 0 and not any(a.startswith("--base-id") for a in argv)):
            continue
        if not looks_like_envoy(executable_of(pid) or argv[0], argv):
            continue
        if _NOT_SERVING & set(argv):
            continue
        line = parse_envoy_argv(argv[1:])
        held = line.base_id
        if held is None and not line.use_dynamic_base_id and "--base-id" not in argv:
            held = 0  # Envoy's default
        if held == base_id and ours not in _ancestors(pid) and _shares_network(pid):
            found.append(pid)
    return sorted(found)


def _same_setup(pid: int, script: Path) -> int | None:
    """The envoy-autoreload above Envoy `pid` if it runs this very start script (then
    the base id is ours, held by a running daemon of this setup), else None."""
    want = os.path.realpath(script)
    for ancestor in _ancestors(pid):
        argv = _argv(ancestor)
        if not any("envoy_autoreload" in a or "envoy-autoreload" in a for a in argv[:3]):
            continue
        try:
            cwd = os.readlink(f"/proc/{ancestor}/cwd")
        except OSError:
            cwd = "/"
        if any(os.path.realpath(os.path.join(cwd, a)) == want for a in argv[1:]):
            return ancestor
    return None


def base_id_in_use(base_id: int, script: Path) -> list[Trap]:
    """Epoch 0 on a base id another live Envoy uses exits 1 "unable to bind domain
    socket" (ENVOY_FACTS §4); a leftover segment with no live owner is harmless, epoch
    0 replaces it."""
    segment = shm_path(base_id)
    for pid in envoys_on_base_id(base_id):
        daemon = _same_setup(pid, script)
        if daemon is None:
            return [
                Trap(
                    "error",
                    "base id",
                    f"base id {base_id} is used by another Envoy (pid {pid}): pick another "
                    "with --base-id in the start script (and --base-id here)",
                )
            ]
        return [
            Trap(
                "info",
                "base id",
                f"base id {base_id} is served by the running envoy-autoreload (pid {daemon}) "
                f"of this start script (Envoy pid {pid})",
            )
        ]
    if segment.exists():
        return [
            Trap(
                "info",
                "base id",
                f"base id {base_id}: {segment} is a leftover, no live "
                "Envoy holds it (epoch 0 replaces it)",
            )
        ]
    return [Trap("info", "base id", f"base id {base_id}: no other Envoy uses it")]


# --- Trap 2, 4: /dev/shm --------------------------------------------------------------


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def segment_owner(base_id: int) -> list[Trap]:
    """Epoch 0 unlinks the segment and creates it anew (O_EXCL): in sticky /dev/shm only
    its owner (or root) may unlink it, so another user's segment makes Envoy panic
    "cannot open shared memory region ... check user permissions"."""
    segment = shm_path(base_id)
    try:
        owner = segment.stat().st_uid
    except OSError:
        return []
    euid = os.geteuid()
    if owner == euid or euid == 0:
        return []
    return [
        Trap(
            "error",
            "shm",
            f"{segment} is owned by {_user(owner)}, not by us ({_user(euid)}): Envoy cannot "
            f"replace it; remove it (rm {segment}) if no Envoy of that user runs, or run as "
            "that user",
        )
    ]


def _kib(n: int) -> str:
    if n < 1 << 20:
        return f"{n / 1024:.0f} KiB"
    return f"{n / (1 << 20):.1f} MiB" if n < 1 << 30 else f"{n / (1 << 30):.1f} GiB"


def _segment_bytes(base_id: int | None) -> int:
    """What one segment takes in tmpfs: its size (the existing one's, else the largest
    layout we know, 104 bytes for 11.104) rounded up to whole pages, since tmpfs
    allocates pages."""
    size = max(layout.size for layout in KNOWN_LAYOUTS.values())
    if base_id is not None:
        with contextlib.suppress(OSError):
            size = max(size, shm_path(base_id).stat().st_size)
    page = os.sysconf("SC_PAGE_SIZE")
    return max(page, -(-size // page) * page)


def _shm_unusable() -> tuple[os.statvfs_result | None, str | None]:
    """statvfs of /dev/shm, or why Envoy could create nothing there at all."""
    try:
        vfs = os.statvfs(SHM_DIR)
    except OSError as err:
        return None, f"{SHM_DIR}: {err.strerror}"
    if vfs.f_flag & os.ST_RDONLY or not os.access(SHM_DIR, os.W_OK | os.X_OK):
        return None, f"{SHM_DIR} is not writable for us"
    return vfs, None


def shm_space(base_id: int | None) -> list[Trap]:
    """A missing, read-only or full /dev/shm lets Envoy start nowhere: epoch 0 cannot
    create its segment. Room for three Envoys' segments is needed, plus headroom (1 MiB)
    against whatever else fills /dev/shm."""
    vfs, unusable = _shm_unusable()
    if vfs is None:
        return [
            Trap(
                "error",
                "shm",
                f"{unusable}: Envoy cannot create its hot-restart shared memory; mount a "
                "writable tmpfs there (Docker: --shm-size)",
            )
        ]
    if vfs.f_blocks == 0:
        return [Trap("info", "shm", f"{SHM_DIR}: no size limit")]
    need = FAMILY_PROCESSES * _segment_bytes(base_id)
    free = vfs.f_bavail * vfs.f_frsize
    numbers = f"{_kib(free)} free of {_kib(vfs.f_blocks * vfs.f_frsize)}; Envoy needs {_kib(need)}"
    enlarge = "free it or enlarge it (Docker: --shm-size, Kubernetes: emptyDir medium Memory)"
    if free < need:
        return [
            Trap(
                "error",
                "shm",
                f"{SHM_DIR} is full ({numbers}): Envoy cannot create its shared memory; {enlarge}",
            )
        ]
    if free < need + SHM_HEADROOM:
        return [
            Trap(
                "warning",
                "shm",
                f"{SHM_DIR} is nearly full ({numbers} plus {_kib(SHM_HEADROOM)} headroom): "
                f"{enlarge}",
            )
        ]
    return [Trap("info", "shm", f"{SHM_DIR}: {numbers}")]


# --- Trap 3: single-file bind mounts --------------------------------------------------


def _unescape(field_text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def mount_points() -> set[str] | None:
    """Every mount point in our mount namespace, or None without /proc/self/mountinfo."""
    try:
        lines = Path("/proc/self/mountinfo").read_text(errors="replace").splitlines()
    except OSError:
        return None
    return {_unescape(line.split()[4]) for line in lines if len(line.split()) > 4}


def _is_file_mount(path: str, points: set[str] | None) -> bool:
    """Whether `path` (resolved) is itself a mount point that is not a directory.

    From mountinfo, not by comparing st_dev with the directory's: on overlayfs (a
    container's root) a file's st_dev may be its layer's, unlike its directory's."""
    if not os.path.exists(path) or os.path.isdir(path):
        return False
    if points is not None:
        return path in points
    try:
        return os.stat(path).st_dev != os.stat(os.path.dirname(path)).st_dev
    except OSError:
        return False


def single_file_mounts(settings: Settings) -> list[Trap]:
    """A file bind-mounted on its own (Docker `-v file:file`, Kubernetes `subPath`) stays
    the inode it was at mount time: the host's atomic replace never reaches the
    container, and inotify sees nothing. Checked: --config, --watch files, and mount
    points inside --watch directories."""
    points = mount_points()
    candidates = [settings.config, *settings.watch] if settings.config else [*settings.watch]
    found: list[str] = []
    for path in candidates:
        real = os.path.realpath(path)
        if os.path.isdir(real) and points is not None:
            found += sorted(
                p for p in points if p.startswith(real + os.sep) and _is_file_mount(p, points)
            )
        elif _is_file_mount(real, points):
            found.append(real)
    traps = [
        Trap(
            "warning",
            "mount",
            f"{path} is a single-file bind mount (subPath/`-v file:file`): "
            "a replacement on the host is never seen; mount the directory instead",
        )
        for path in dict.fromkeys(found)
    ]
    if not traps and candidates:
        traps.append(Trap("info", "mount", "no single-file bind mount among the watched files"))
    return traps


# --- All of them ----------------------------------------------------------------------


def startup_traps(settings: Settings, environ: Mapping[str, str] | None = None) -> list[Trap]:
    """Every trap for this run, in a fixed order; `environ` is what the start script
    will inherit (default: ours). Reads only: safe while a family serves."""
    facts = read_script(settings.start_script, environ)
    traps: list[Trap] = []
    base_id = settings.base_id
    if facts is not None:
        traps += hot_restart_disabled(settings.start_script, facts)
        traps += config_mismatch(settings, facts)
        traps += base_id_mismatch(settings, facts)
        if base_id is None:
            base_id = script_base_id(facts)
    if base_id is not None:
        traps += base_id_in_use(base_id, settings.start_script)
        traps += segment_owner(base_id)
    traps += shm_space(base_id)
    traps += single_file_mounts(settings)
    return traps
