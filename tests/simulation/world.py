"""Simulated implementations of every port in `envoy_autoreload/ports.py`.

A virtual clock that tests move by hand (trio's MockClock), processes that are model
Envoys (`model.py`), a gate whose validation takes virtual time, and a watched config
whose writes raise events through the real `Debouncer`. The supervisor under test is
the real one: only the world is simulated, so everything it decides is real code.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from envoy_autoreload.bootstrap_facts import BootstrapFacts
from envoy_autoreload.content import digest_of_files
from envoy_autoreload.debounce import Debouncer
from envoy_autoreload.digest import Snapshot, WatchRoot
from envoy_autoreload.envoy_binary import BinaryInfo
from envoy_autoreload.envoy_process import EnvoyProcess
from envoy_autoreload.health import HealthObservation, UrlResult
from envoy_autoreload.loop import DeadlineReached, Event, FdReady, SignalReceived
from envoy_autoreload.references import References
from envoy_autoreload.roster import Generation
from envoy_autoreload.signal_mask import SIGNAL_PRIORITY
from envoy_autoreload.states import Timer
from envoy_autoreload.validation import PreflightOutcome, Verdict
from envoy_autoreload.watch.changes import Listed, SettledBurst
from tests.simulation.model import Content, EnvoyModel, Proc, ProcState

CONFIG_PATH = Path("/sim/etc/envoy/envoy.yaml")
# A file every config names (a certificate, a `direct_response` body): Envoy reads it at
# start and at validation, so what a verdict says depends on it too (check_ahead.py).
NAMED_PATH = Path("/sim/etc/envoy/body.txt")
HOT_RESTART_VERSION = "11.104"


class SimReactor:
    """The reactor on a virtual clock. `poll()` never blocks: it returns what is due now,
    and the harness moves time between polls."""

    def __init__(self) -> None:
        self._now = 0.0
        self._deadlines: dict[Hashable, float] = {}
        self._readers: dict[int, Hashable] = {}
        self.pending_signals: set[signal.Signals] = set()
        self.ready: list[Hashable] = []  # keys whose fd is readable now

    def now(self) -> float:
        return self._now

    def move_to(self, at: float) -> None:
        assert at >= self._now, "the clock never goes back"
        self._now = at

    def next_deadline(self) -> float | None:
        return min(self._deadlines.values()) if self._deadlines else None

    def poll(self) -> list[Event]:
        ordered = sorted(self.pending_signals, key=SIGNAL_PRIORITY.index)
        self.pending_signals = set()
        events: list[Event] = [SignalReceived(s) for s in ordered]
        ready, self.ready = self.ready, []
        events.extend(FdReady(key) for key in ready)
        due = sorted((at, str(key), key) for key, at in self._deadlines.items() if at <= self._now)
        events.extend(DeadlineReached(key) for _at, _name, key in due)
        return events

    def claim(self, event: DeadlineReached) -> bool:
        at = self._deadlines.get(event.key)
        if at is None or at > self._now:
            return False
        del self._deadlines[event.key]
        return True

    def set_timeout(self, key: Hashable, after_s: float) -> None:
        self._deadlines[key] = self._now + max(0.0, after_s)

    def set_deadline(self, key: Hashable, at: float) -> None:
        self._deadlines[key] = at

    def cancel(self, key: Hashable) -> None:
        self._deadlines.pop(key, None)

    def has_deadline(self, key: Hashable) -> bool:
        return key in self._deadlines

    def add_reader(self, fd: int, key: Hashable) -> None:
        self._readers[fd] = key

    def remove_reader(self, fd: int) -> None:
        self._readers.pop(fd, None)

    def take_pending(self) -> set[signal.Signals]:
        pending, self.pending_signals = self.pending_signals, set()
        return pending


class SimChild:
    """A start script that exec'd a model Envoy: the `ChildProcess` port."""

    def __init__(self, world: SimWorld, proc: Proc) -> None:
        self._world = world
        self.proc = proc
        self._reaped: int | None = None
        self.spawned_at: float | None = world.reactor.now()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self._reaped

    @property
    def stderr_tail(self) -> Sequence[str]:
        return self.proc.stderr[-12:]

    def poll(self) -> int | None:
        if self._reaped is None and not self.proc.alive:
            self._reaped = self.proc.returncode
        return self._reaped

    def send_signal(self, signum: signal.Signals) -> None:
        if self._reaped is None:  # Popen.send_signal polls first (bpo-38630)
            self._world.deliver(self.proc, signum)

    def signal_envoy(self, signum: signal.Signals, envoy: EnvoyProcess | None) -> None:
        self.send_signal(signum)

    def kill(self, signum: signal.Signals = signal.SIGKILL) -> None:
        self.send_signal(signum)

    def wait(self, timeout_s: float) -> None:
        return None

    def finish_group(self, grace_s: float) -> None:
        """The model has no groups: a process that outlived its SIGTERM is KILLed."""
        self.kill()

    def stderr_fd(self) -> int | None:
        return None

    def pump_stderr(self, on_line: Callable[[str], None] | None = None) -> bool:
        return False

    def close_stderr(self) -> None:
        return None

    def last_error_line(self) -> str | None:
        return self.proc.stderr[-1] if self.proc.stderr else None

    def inheritable_stderr_fd(self) -> int | None:
        return None


@dataclass
class Spawned:
    pid: int
    at: float
    epoch: int
    content: Content | None
    newest_serving_epoch: int | None
    alive_epochs: tuple[int, ...]


class SimProcesses:
    """Every start may be fired ahead (there is always a standby here), so the
    simulation takes `ready_start.py`'s way wherever its condition holds."""

    def __init__(self, world: SimWorld) -> None:
        self._world = world
        self._fired: tuple[int, Path | None, SimChild] | None = None
        self._discarded: int | None = None

    def spawn(self, epoch: int, snapshot: Path | None = None) -> SimChild:
        fired, self._fired = self._fired, None
        if fired is not None and fired[:2] == (epoch, snapshot):
            return fired[2]
        if fired is not None:
            self._discard(fired[2])
        return self._world.spawn(epoch, snapshot)

    def fire_ahead(self, epoch: int, snapshot: Path | None) -> bool:
        if self._fired is not None:
            return False
        self._fired = (epoch, snapshot, self._world.spawn(epoch, snapshot))
        self._world.fired_ahead += 1
        return True

    def started_ahead(self, epoch: int) -> bool:
        return self._fired is not None and self._fired[0] == epoch

    def discard_fired(self) -> int | None:
        if self._fired is not None:
            self._discard(self._fired[2])
            self._fired = None
        pid, self._discarded = self._discarded, None
        return pid

    def _discard(self, child: SimChild) -> None:
        child.kill()
        self._discarded = child.pid
        self._world.discarded_ahead.append(child.pid)

    def adopt(self, pid: int, stderr_fd: int | None) -> SimChild:
        """A re-exec: the same model process, a fresh handle on it."""
        return SimChild(self._world, self._world.model.by_pid(pid))

    def reap_strays(self, ours: set[int]) -> None:
        return None

    def prepare(self) -> None:
        return None

    def release(self) -> None:
        if self._fired is not None:
            self._discard(self._fired[2])
            self._fired = None


class SimFacts:
    """`EnvoyFacts` answered from the model: LIVE over a fresh admin connection means
    the process at that epoch is LIVE (§15); the flag is the model's flag."""

    def __init__(self, world: SimWorld) -> None:
        self._world = world
        self.base_id: int | None = 0
        self.hot_restart_version: str | None = None
        self.envoy_version: str | None = None
        self.admin_blind = False  # admin is not where we look (REVIEW-core finding 3)
        self.asked: list[tuple[int, float]] = []  # (epoch, when) of every LIVE probe

    def _proc(self, gen: Generation) -> Proc:
        return self._world.model.by_pid(gen.pid)

    def observe(self, gen: Generation) -> None:
        return None

    def is_live(self, gen: Generation) -> bool:
        proc = self._proc(gen)
        self.asked.append((gen.epoch, self._world.reactor.now()))
        if self.admin_blind:
            return False
        if proc.state is ProcState.LIVE and proc.epoch == gen.epoch:
            self.hot_restart_version = proc.hot_restart_version
            return True
        return False

    def took_over(self, gen: Generation) -> bool:
        return gen.epoch > 0 and self._proc(gen).live_at is not None

    def handed_over(self, gen: Generation) -> bool:
        proc = self._proc(gen)
        return gen.epoch > 0 and proc.state is ProcState.LIVE

    def restore_flag(self, parent: Generation, epoch: int) -> None:
        self._world.model.clear_flag()

    def remove_shared_memory(self) -> None:
        return None

    def parent_shutdown_s(self, gen: Generation) -> float | None:
        return self._world.model.parent_shutdown_s

    def config_path(self, gen: Generation) -> Path | None:
        return CONFIG_PATH

    def config_flags(self, gen: Generation) -> tuple[str, ...]:
        return ()

    def forget(self, gen: Generation) -> None:
        return None

    def mismatches(self, gen: Generation) -> list[str]:
        return []

    def relative_names_trap(self, gen: Generation) -> str | None:
        return None


@dataclass
class _Validation:
    content: Content | None
    binary_ok: bool
    hot_restart_version: str
    done_at: float | None  # None: hangs until killed at its deadline
    named_ok: bool = True  # the named file as the validation read it
    killed: bool = False
    read_at: float | None = None  # when it reads the files (None: it already did)


class SimGate:
    """`envoy --mode validate` (and the binary checks) taking virtual time."""

    def __init__(self, world: SimWorld, timeout_s: float) -> None:
        self._world = world
        self._timeout_s = timeout_s
        self._running: _Validation | None = None
        self.duration_s = 0.04  # §1: ~40 ms
        self.hangs = False
        # When Envoy reads the config, after the validation began: it does within
        # milliseconds (ENVOY_FACTS §1), so 0 by default; a later read widens the window
        # between the supervisor's pin and what the verdict is about (finding 8b).
        self.read_after_s = 0.0
        self.ahead_started = 0  # validations started ahead of their burst
        self.passed: set[str | None] = set()  # digests that passed
        # A validation started ahead (check_ahead.py), with what it was started for:
        # `begin` takes it for the same snapshot and binary only.
        self._ahead: tuple[Path | None, bool, str, _Validation] | None = None

    @property
    def enabled(self) -> bool:
        return True

    @property
    def busy(self) -> bool:
        return self._running is not None

    def owns(self, key: Hashable) -> bool:
        return False

    def child_pids(self) -> set[int]:
        return set()

    def next_at(self) -> float | None:
        running = self._running
        if running is None or running.killed:
            return None
        moments = [t for t in (running.read_at, running.done_at) if t is not None and t >= 0]
        return min(moments) if moments else None

    def check_now(self, config: Path | None, flags: Sequence[str] = ()) -> PreflightOutcome:
        world = self._world
        content = world.content_at(config)
        return self._verdict(_Validation(content, world.binary_ok, world.binary_hrv, 0.0))

    def begin(
        self, known_binary: BinaryInfo | None, config: Path | None, flags: Sequence[str] = ()
    ) -> PreflightOutcome | None:
        assert self._running is None
        world = self._world
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:3] == (config, world.binary_ok, world.binary_hrv):
            run = ahead[3]
            done = run.done_at is not None and 0 <= run.done_at <= world.reactor.now()
            if done and run.read_at is None:
                # Finished before the burst was due (its exit reaped then): the verdict
                # now, as `Gate._next_step` takes a finished run ahead.
                return self._verdict(run)
            self._running = run
        else:
            self._running = self._validation(config)
        world.reactor.set_timeout(Timer.COMMAND_DEADLINE, self._timeout_s)
        return None

    def _validation(self, config: Path | None) -> _Validation:
        world = self._world
        done = None if self.hangs else world.reactor.now() + self.duration_s
        run = _Validation(world.content_at(config), world.binary_ok, world.binary_hrv, done)
        run.named_ok = world.named_ok
        if self.read_after_s > 0 and config is None:  # a snapshot never changes
            run.read_at = world.reactor.now() + self.read_after_s
        return run

    def check_ahead(
        self, known_binary: BinaryInfo | None, config: Path | None, flags: Sequence[str] = ()
    ) -> bool:
        if self._running is not None or self._ahead is not None:
            return False
        world = self._world
        self._ahead = (config, world.binary_ok, world.binary_hrv, self._validation(config))
        self.ahead_started += 1
        return True

    @property
    def ahead(self) -> bool:
        return self._ahead is not None

    def verdict_ready(
        self, known_binary: BinaryInfo | None, config: Path | None, flags: Sequence[str] = ()
    ) -> bool:
        """As `CommandGate.verdict_ready`: the run ahead on exactly these arguments is
        done and passed, and the binary is the one known (no check of it to run)."""
        world, ahead = self._world, self._ahead
        if self._running is not None or ahead is None:
            return False
        if known_binary is None or known_binary.hot_restart_version != world.binary_hrv:
            return False
        run = ahead[3]
        done = run.done_at is not None and 0 <= run.done_at <= world.reactor.now()
        same = ahead[:3] == (config, world.binary_ok, world.binary_hrv)
        return same and done and run.read_at is None and self._verdict(run, record=False).ok

    def drop_ahead(self) -> None:
        self._ahead = None  # killed: nothing of it is ever reported

    def finish_due(self, now: float) -> None:
        running = self._running
        if running is not None and running.read_at is not None and running.read_at <= now:
            running.content = self._world.disk  # what the verdict will be about
            running.named_ok = self._world.named_ok
            running.read_at = None
        if running is not None and running.done_at is not None and running.done_at <= now:
            running.done_at = -1.0  # finished: SIGCHLD
            self._world.reactor.pending_signals.add(signal.SIGCHLD)

    def on_output(self, key: Hashable) -> None:
        return None

    def on_deadline(self) -> None:
        running = self._running
        if running is not None:
            running.killed = True
            running.done_at = -1.0
            self._world.reactor.pending_signals.add(signal.SIGCHLD)

    def poll(self) -> PreflightOutcome | None:
        running = self._running
        if running is None or running.done_at != -1.0:
            return None
        self._running = None
        self._world.reactor.cancel(Timer.COMMAND_DEADLINE)
        if running.killed:
            return _outcome(Verdict.FAILED, "validation failed: timed out", None)
        return self._verdict(running)

    def abandon(self) -> None:
        self._running = None
        self._ahead = None

    def bootstrap_facts(self, config: Path | None) -> BootstrapFacts | None:
        return None  # the modelled config names no file Envoy writes or reads

    def read_facts_now(self, config: Path) -> BootstrapFacts | None:
        return BootstrapFacts(config, None, None, References(frozenset({NAMED_PATH}), ()))

    def facts_before_loop(self, config: Path) -> BootstrapFacts:
        """What parsing /sim/... on the real disk gave before: nothing to follow."""
        return BootstrapFacts(config, None, None, None, f"cannot read {config}")

    def _verdict(self, run: _Validation, record: bool = True) -> PreflightOutcome:
        binary = BinaryInfo(Path("/sim/envoy"), (1, 1, 1, 1), "x/1.40.0/x", run.hot_restart_version)
        if not run.binary_ok:
            return _outcome(Verdict.BINARY_REFUSED, "binary refused: not Envoy", None)
        if run.content is None:
            return _outcome(Verdict.FAILED, "validation failed: Invalid path", binary)
        if not run.content.good:
            return _outcome(Verdict.FAILED, "validation failed: bad config", binary)
        if not run.named_ok:
            return _outcome(Verdict.FAILED, f"validation failed: {NAMED_PATH} is bad", binary)
        if record:
            self.passed.add(run.content.digest)
        return _outcome(Verdict.PASSED, "", binary)


def _outcome(verdict: Verdict, message: str, binary: BinaryInfo | None) -> PreflightOutcome:
    return PreflightOutcome(verdict, message, None, binary, 0.04)


class SimContent:
    """The watched config: writes raise events; the real Debouncer settles them."""

    def __init__(
        self, world: SimWorld, quiet_s: float, max_wait_s: float, build_s: float = 0.0
    ) -> None:
        self._world = world
        self._debouncer = Debouncer(quiet_s, max_wait_s)
        self._unread = 0
        self.snapshot: Snapshot | None = None
        self.events_total = 0
        # The first reading of the files after epoch 0 started (watch/build.py): it
        # takes `build_s` of virtual time; a write meanwhile makes the reference unknown.
        self._build_s = build_s
        self._build_done_at: float | None = None
        self._build_rang = False
        self._touched = False
        self.build_window: tuple[float, float | None] | None = None  # virtual times

    def __hash__(self) -> int:
        return id(self)

    @property
    def roots(self) -> tuple[WatchRoot, ...]:
        return (WatchRoot(CONFIG_PATH), WatchRoot(NAMED_PATH))

    @property
    def active(self) -> bool:
        return True

    @property
    def watch_count(self) -> int:
        return 1

    def written(self) -> None:
        """A write landed: the kernel has an event for us."""
        self._unread += 1
        self._world.reactor.ready.append(self)

    @property
    def building(self) -> bool:
        return self._build_done_at is not None

    @property
    def listed(self) -> Listed:
        return Listed(0, 1)

    def plan(self) -> Snapshot:
        return self.current()

    def start(
        self,
        *,
        degraded_ok: bool,
        background: bool = False,
        changed_since_ns: int | None = None,
    ) -> Snapshot | None:
        """The real one walks here, after epoch 0's spawn, in no virtual time: no write
        can land between the spawn and the watch, so `changed_since_ns` has nothing to
        find (the rule is proven on real files: tests/integration/test_watch_build.py)."""
        if background and self._build_s > 0:
            self._build_done_at = self._world.reactor.now() + self._build_s
            self.build_window = (self._world.reactor.now(), None)
            self._touched = False
            return None
        self.snapshot = self.current()
        return self.snapshot

    def root_paths(self) -> list[Path]:
        return []

    def remember_roots(
        self,
        identities: Mapping[Path, tuple[int, int] | None],
        listings: Mapping[str, frozenset[str]],
    ) -> None:
        """The real one notes what each root resolved to, for the walk to compare."""

    def start_building(self) -> None:
        """The real one starts its hashing thread here, after epoch 0's spawn."""

    def build_fileno(self) -> int | None:
        return -2 if self.building else None

    def next_at(self) -> float | None:
        return None if self._build_rang else self._build_done_at

    def finish_due(self, now: float) -> None:
        """The worker thread is done: its pipe becomes readable."""
        due = self._build_done_at
        if due is not None and now >= due and not self._build_rang:
            self._build_rang = True
            self._world.reactor.ready.append(self)

    def take_built(self) -> Snapshot | None:
        if not self._build_rang:
            return None
        self.on_readable(self._world.reactor.now())  # what happened meanwhile counts
        self._build_done_at, self._build_rang = None, False
        if self.build_window is not None:
            self.build_window = (self.build_window[0], self._world.reactor.now())
        self.snapshot = self.current()
        if not self._touched:
            return self.snapshot
        files = {str(CONFIG_PATH): "unknown"}  # equal to no content (content.UNKNOWN)
        return Snapshot(files, digest_of_files(files), frozenset())

    def fileno(self) -> int:
        return -1

    def on_readable(self, now: float, *, drain: bool = True) -> int:
        count, self._unread = self._unread, 0
        if count:
            self._debouncer.add(now, {str(CONFIG_PATH)})
            self.events_total += count
            self._touched = self._touched or self.building
        return count

    def suspect(self, path: Path) -> None:
        self._debouncer.add(self._world.reactor.now(), {str(path)})
        self.events_total += 1
        self._touched = self._touched or self.building

    def deadline(self) -> float | None:
        return None if self.building else self._debouncer.deadline()

    def settle(self, now: float) -> SettledBurst | None:
        if self.building or not self._debouncer.is_due(now):
            return None
        paths = self._debouncer.take()
        self.snapshot = self.current()
        return SettledBurst(len(paths), frozenset(paths), self.snapshot)

    def current(self) -> Snapshot:
        content = self._world.disk
        if content is None:
            return Snapshot({}, "missing", frozenset(), missing=(str(CONFIG_PATH),))
        named = "ok" if self._world.named_ok else "bad"
        files = {str(CONFIG_PATH): content.digest, str(NAMED_PATH): named}
        return Snapshot(files, digest_of_files(files), frozenset())

    def rescan(self) -> Snapshot:
        return self.current()

    @property
    def applied(self) -> Snapshot | None:
        return None if self.building else self.current()

    def is_excluded(self, path: Path) -> bool:
        return False

    def is_noise(self, path: Path) -> bool:
        return False

    def has_one_name(self, path: Path) -> bool:
        return True

    def exclude_paths(self, paths: Iterable[Path]) -> None:
        return None

    def watch_referenced(self, paths: Iterable[Path]) -> bool:
        return False  # the modelled config names no other files

    def close(self) -> None:
        return None


@dataclass
class SimWorld:
    """The whole simulated world around one supervisor."""

    parent_shutdown_s: float = 3.0
    disk: Content | None = field(default_factory=lambda: Content(0))
    binary_ok: bool = True
    binary_hrv: str = HOT_RESTART_VERSION
    named_ok: bool = True  # NAMED_PATH: a bad one fails validation and Envoy's start
    reactor: SimReactor = field(default_factory=SimReactor)
    spawned: list[Spawned] = field(default_factory=list)
    stopping: Callable[[], bool] = lambda: False
    planned_stop: Callable[[int], bool] = lambda pid: False

    def __post_init__(self) -> None:
        self.model = EnvoyModel(self.parent_shutdown_s)
        self.model.on_exit = lambda proc: self.reactor.pending_signals.add(signal.SIGCHLD)
        self.gate_validated: set[str | None] = set()
        self.by_bytes: dict[bytes, Content] = {}
        self.fired_ahead = 0  # starts fired at a burst's deadline (`ready_start.py`)
        self.discarded_ahead: list[int] = []  # ... that were not the start decided

    def config_bytes(self) -> bytes:
        """What the daemon reads from --config: the disk's content, as bytes that map
        back to it (the generation store snapshots them for real, in a temp dir)."""
        content = self.disk
        if content is None:
            raise FileNotFoundError(2, "No such file or directory", str(CONFIG_PATH))
        data = repr(content).encode()
        self.by_bytes[data] = content
        return data

    def content_at(self, snapshot: Path | None) -> Content | None:
        """What Envoy reads from `-c`: the snapshot's bytes, or the disk without one."""
        if snapshot is None:
            return self.disk
        return self.by_bytes[snapshot.read_bytes()]

    def spawn(self, epoch: int, snapshot: Path | None = None) -> SimChild:
        model = self.model
        model.now = self.reactor.now()
        serving = model.serving()
        alive = tuple(p.epoch for p in model.alive())
        content = self.content_at(snapshot)
        if content is not None and not self.named_ok:
            content = dataclasses.replace(content, good=False)  # it cannot load
        proc = model.spawn(epoch, content, self.binary_hrv)
        self.spawned.append(
            Spawned(
                proc.pid,
                model.now,
                epoch,
                content,
                serving.epoch if serving else None,
                alive,
            )
        )
        return SimChild(self, proc)

    def deliver(self, proc: Proc, signum: signal.Signals) -> None:
        self.model.now = self.reactor.now()
        self.model.send_signal(proc, signum, stopping=self.stopping(), planned=self.planned_stop)


_ADMIN_STATES = {
    ProcState.LIVE: "LIVE",
    ProcState.DRAINING: "DRAINING",
    ProcState.INITIALIZING: "PRE_INITIALIZING",
}


class SimHealth:
    """Probation's checks answered from the model at once: admin is answered by the
    process that answers a fresh connection (the newest epoch, even while it starts,
    §15) with its state and epoch; one URL answers 2xx when the generation's content is
    healthy."""

    URL = "http://127.0.0.1:10000/healthz"

    def __init__(self, world: SimWorld) -> None:
        self._world = world
        self._pending: HealthObservation | None = None
        self.rounds = 0
        self.begun: list[tuple[float, int, bool]] = []  # (when, epoch, final) of each round

    def fileno(self) -> int:
        return -7  # never polled: `begin_round` marks the key ready itself

    def begin_round(self, gen: Generation, final: bool = False) -> None:
        model = self._world.model
        model.now = self._world.reactor.now()
        proc = model.by_pid(gen.pid)
        self.rounds += 1
        self.begun.append((self._world.reactor.now(), gen.epoch, final))
        healthy = proc.content is not None and proc.content.healthy
        admin = model.admin_answerer()
        state = _ADMIN_STATES.get(admin.state) if admin is not None else None
        self._pending = HealthObservation(
            epoch=gen.epoch,
            pid=gen.pid,
            admin_state=state,
            admin_epoch=admin.epoch if admin is not None and state else None,
            listener_create_failures=0 if state else None,
            urls=(UrlResult(self.URL, healthy, "HTTP 200" if healthy else "HTTP 503"),),
        )
        self._world.reactor.ready.append(self)

    def take(self) -> HealthObservation | None:
        seen, self._pending = self._pending, None
        return seen

    def close(self) -> None:
        return None
