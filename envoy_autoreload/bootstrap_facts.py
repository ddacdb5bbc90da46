"""What the daemon needs to know from an Envoy bootstrap, read so that the event loop
never stalls on a big one: parsed in a child process, or at once when it is small.

Two things in the loop's time need the parsed bootstrap: once a config passed the gate,
the files it makes Envoy write (access logs, left out of the digest) and read
(certificates, Lua sources: watched too, `references.py`); and once a generation
starts, its admin address, where the LIVE probe asks (`family.py`). yaml.load takes
about 0.45 s per MB even with libyaml, whose constructor is Python code: a 5 MB config
held the loop for 3-4 s twice per restart, while no signal, child exit, control request
or probe was handled (issue 16). Built from libyaml's events (`plain_yaml.py`) it is
about 0.11 s per MB, still too long for the loop.

So a config larger than `INLINE_MAX_BYTES` is parsed by a child, `python -c` running
`main()` below, which prints what it found as one JSON object. `BootstrapReader` runs
these children for the gate (`gate.py`): their pipes sit in the reactor, they are
reaped by PID on SIGCHLD and killed at their deadline, like the gate's other commands,
and the gate starts one as it starts validating, so a verdict that waits for the facts
waits for the slower of the two. A smaller config (most are) is parsed at once: in
less time than starting the child costs the loop, and without the 40-140 ms the
child's Python takes to start, which a restart would wait for. Facts are kept per file
and its identity (device, inode, size, mtime): a snapshot, named by its sha256, is
parsed once in its life.

Rejected: a worker thread (health.py's pattern). libyaml keeps the GIL while PyYAML
builds the document, and the loop's thread waits for the GIL again after each system
call it makes, a switch interval (5 ms) at a time: measured while a thread parsed 4 MB,
one LIVE probe (a fresh connection and a few stats) took 65 ms on average and 260 ms at
worst. Also rejected: reading only the `admin` block with a text scan. The access
loggers and the files to watch lie anywhere in the document, and a flow-style or JSON
config, an alias or a merge key would need a full parse anyway.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from envoy_autoreload.addresses import AdminAddress
from envoy_autoreload.command import CommandResult, RunningCommand
from envoy_autoreload.envoy_config import (
    admin_address_in,
    parse_bootstrap,
    unreadable,
)
from envoy_autoreload.errors import ConfigError
from envoy_autoreload.logs import log_event
from envoy_autoreload.references import References, files_envoy_reads

if TYPE_CHECKING:
    from envoy_autoreload.ports import Reactor

logger = logging.getLogger(__name__)

# A parse taking longer is given up and the config's facts are unknown, as for a file
# PyYAML cannot read. About 0.6 s per MB: 120 s is a config of some 200 MB.
PARSE_TIMEOUT_S: Final = 120.0
KEPT: Final = 64  # configs whose facts are kept: far more than --keep-generations
# A config this small is parsed where it is asked for: at most ~9 ms (0.27 ms per KiB of
# dense YAML, measured; a few times that on a loaded box), about what starting the child
# costs the loop, where the child's Python takes 40-140 ms to start, a delay every
# restart would wait for (bench/latency.py measured it).
INLINE_MAX_BYTES: Final = 32 * 1024
_PACKAGE_ROOT: Final = str(Path(__file__).resolve().parent.parent)
# The child imports this very copy of the package, wherever the daemon found it.
_CHILD: Final = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from envoy_autoreload.bootstrap_facts import main; sys.exit(main(sys.argv[1:]))"
)

Identity = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


@dataclass(frozen=True, slots=True)
class BootstrapFacts:
    """What one read of a config found."""

    path: Path
    identity: Identity | None  # of the file read; None when it could not be read
    admin: AdminAddress | None  # admin.address.socket_address, when usable
    references: References | None  # None: unreadable, unparsable, or not a mapping
    error: str | None = None  # why it could not be read or parsed (a ConfigError line)


def identity_of(path: Path) -> Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_facts(path: Path, base: Path) -> BootstrapFacts:
    """Parse `path` here and now: in the child, and before the loop runs (start-up).
    `base` is Envoy's working directory, which relative paths are taken from."""
    facts = read_facts_up_to(path, base, None)
    assert facts is not None
    return facts


def read_facts_up_to(path: Path, base: Path, max_bytes: int | None) -> BootstrapFacts | None:
    """`read_facts`, or None when the file holds more than `max_bytes` or is no regular
    file: opened without blocking then, since a FIFO would hang the loop in `open`."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_NONBLOCK if max_bytes is not None else 0)
    try:
        with open(os.open(path, flags), "rb") as config:
            st = os.fstat(config.fileno())
            if max_bytes is not None and (not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes):
                return None
            data = config.read() if max_bytes is None else config.read(max_bytes + 1)
    except OSError as err:
        return BootstrapFacts(path, None, None, None, str(unreadable(path, err)))
    if max_bytes is not None and len(data) > max_bytes:
        return None  # it grew since the stat
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    try:
        document = parse_bootstrap(data, path)
    except ConfigError as err:
        return BootstrapFacts(path, identity, None, None, str(err))
    references = files_envoy_reads(document, base) if isinstance(document, Mapping) else None
    return BootstrapFacts(path, identity, admin_address_in(document), references)


def to_json(facts: BootstrapFacts) -> str:
    references = facts.references
    return json.dumps(
        {
            "identity": facts.identity,
            "admin": None if facts.admin is None else [facts.admin.host, facts.admin.port],
            "reads": None if references is None else sorted(map(str, references.reads)),
            "excluded": None
            if references is None
            else [[str(path), why] for path, why in references.excluded],
            "relative": None if references is None else list(references.relative),
            "error": facts.error,
        }
    )


def from_json(text: str, path: Path) -> BootstrapFacts:
    """The child's answer; ValueError (or KeyError, TypeError) when it is not one."""
    found = json.loads(text)
    identity, admin, reads = found["identity"], found["admin"], found["reads"]
    references = None
    if reads is not None:
        excluded = tuple((Path(p), str(why)) for p, why in found["excluded"])
        relative = tuple(str(name) for name in found["relative"])
        references = References(frozenset(Path(p) for p in reads), excluded, relative)
    return BootstrapFacts(
        path,
        None if identity is None else (identity[0], identity[1], identity[2], identity[3]),
        None if admin is None else AdminAddress(str(admin[0]), int(admin[1])),
        references,
        None if found["error"] is None else str(found["error"]),
    )


def main(argv: list[str]) -> int:
    """The child: `PATH BASE` in, the facts as one JSON object on stdout."""
    path, base = argv
    sys.stdout.write(to_json(read_facts(Path(path), Path(base))) + "\n")
    return 0


class BootstrapReader:
    """The facts of every config the daemon validates or runs, each parsed once, in a
    child. Owned by the gate, which hands it its fds, SIGCHLD and deadline."""

    def __init__(
        self,
        reactor: Reactor,
        started: Callable[[], None] | None = None,
        timeout_s: float = PARSE_TIMEOUT_S,
    ) -> None:
        """`started` is told when a parse starts: whoever owns the deadline arms it."""
        self._reactor = reactor
        self._started = started
        self._timeout_s = timeout_s
        self._known: OrderedDict[Path, BootstrapFacts] = OrderedDict()
        self._running: dict[Path, RunningCommand] = {}

    def lookup(self, path: Path) -> BootstrapFacts | None:
        """The facts of `path` as it is now (a stat, no read), once parsed."""
        facts = self._known.get(path)
        if facts is None or facts.identity != identity_of(path):
            return None
        self._known.move_to_end(path)
        return facts

    def latest(self, path: Path) -> BootstrapFacts | None:
        """The facts of `path` as last parsed, whatever it holds now: what a verdict on
        it was about (a snapshot never changes; --config itself may have)."""
        return self._known.get(path)

    def pending(self, path: Path) -> bool:
        return path in self._running

    def read_small(self, path: Path) -> BootstrapFacts | None:
        """The facts of `path` if it is small enough to parse at once (known, or parsed
        now); None for a big one, which only `request` parses (in a child)."""
        facts = self.lookup(path)
        if facts is None and path not in self._running:
            facts = read_facts_up_to(path, Path.cwd(), INLINE_MAX_BYTES)
            if facts is not None:
                self._keep(facts)
        return facts

    def request(self, path: Path) -> None:
        """Have `path` parsed unless its facts are known or on their way: at once when
        it is small, else in a child, whose result comes in through `poll()` on SIGCHLD."""
        if path in self._running or self.lookup(path) is not None:
            return
        small = read_facts_up_to(path, Path.cwd(), INLINE_MAX_BYTES)
        if small is not None:
            self._keep(small)
            return
        argv = [sys.executable, "-c", _CHILD, _PACKAGE_ROOT, str(path), str(Path.cwd())]
        try:
            command = RunningCommand(argv, self._timeout_s)
        except OSError as err:
            self._parse_here(path, f"cannot start {sys.executable}: {err.strerror or err}")
            return
        self._running[path] = command
        for fd in command.open_fds():
            self._reactor.add_reader(fd, command)
        if self._started is not None:
            self._started()

    def wait_for(self, path: Path) -> BootstrapFacts:
        """Blocking, before the loop runs (start-up, and a re-exec's adoption): the facts
        of `path`, waiting for its child. The start-up check started that child as it
        began validating, so a big config is parsed alongside the validation rather than
        after Envoy's spawn; and its document is built in the child, not here, where a
        5,000-cluster config (2.2 MB) took the daemon's peak RSS from ~52 to 133 MiB
        (bench/README.md, sixteenth round)."""
        self.request(path)
        command = self._running.get(path)
        if command is not None:
            result = command.finish_now()
            self._drop(path, command)
            self._finished(path, result)
        return self.lookup(path) or self.latest(path) or read_facts(path, Path.cwd())

    def owns(self, key: Hashable) -> bool:
        return any(key is command for command in self._running.values())

    def on_output(self, key: Hashable) -> None:
        for command in self._running.values():
            if key is command:
                for fd in command.open_fds():
                    if not command.pump(fd):
                        self._reactor.remove_reader(fd)

    def poll(self) -> None:
        """On SIGCHLD: keep the facts of every parse that finished."""
        for path, command in list(self._running.items()):
            result = command.result()
            if result is None:
                continue
            self._drop(path, command)
            self._finished(path, result)

    def child_pids(self) -> set[int]:
        return {command.pid for command in self._running.values()}

    def next_deadline(self) -> float | None:
        return min((c.deadline for c in self._running.values()), default=None)

    def on_deadline(self, now: float) -> None:
        """Kill each parse past its deadline; reaped on SIGCHLD like any other."""
        for command in self._running.values():
            if command.deadline <= now:
                command.kill()

    def abandon(self) -> None:
        """On shutdown: kill and reap every parse."""
        for path, command in list(self._running.items()):
            self._drop(path, command)
            command.abandon()

    def _drop(self, path: Path, command: RunningCommand) -> None:
        for fd in command.all_fds():
            self._reactor.remove_reader(fd)
        command.close()
        del self._running[path]

    def _finished(self, path: Path, result: CommandResult) -> None:
        if result.timed_out:
            error = f"cannot parse Envoy config {path}: gave up after {self._timeout_s:g} s"
            self._keep(BootstrapFacts(path, identity_of(path), None, None, error))
            return
        if result.returncode == 0:
            try:
                self._keep(from_json(result.stdout, path))
                return
            except (ValueError, KeyError, TypeError, IndexError):
                pass
        last = result.stderr.strip().splitlines()[-1:] or ["no answer"]
        self._parse_here(path, f"the parse in a child failed: {last[0]}")

    def _parse_here(self, path: Path, why: str) -> None:
        """The child could not run our code (no interpreter, an odd install): parse in
        the daemon after all, stalling its loop, rather than know nothing."""
        log_event(
            logger,
            logging.WARNING,
            "config.parsed_in_loop",
            f"{why}; parsing {path} in the event loop instead, which stalls it for as "
            "long as the parse takes",
            path=str(path),
        )
        self._keep(read_facts(path, Path.cwd()))

    def _keep(self, facts: BootstrapFacts) -> None:
        self._known[facts.path] = facts
        self._known.move_to_end(facts.path)
        while len(self._known) > KEPT:
            self._known.popitem(last=False)
