"""Starting one epoch and telling when it is LIVE.

Owns the PROBE and START_DEADLINE timers of the starting generation. LIVE means what
Envoy says over a fresh admin connection at that epoch (ENVOY_FACTS §9, §15); before a
starting epoch is given up it is asked once more, and one that already told its parent
to drain is adopted, not killed (REVIEW-core finding 3). What a LIVE or a failure means
for restart requests is the supervisor's business.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from typing import Final

from envoy_autoreload.digest import Snapshot
from envoy_autoreload.envoy_binary import BinaryInfo
from envoy_autoreload.errors import SpawnError
from envoy_autoreload.gatekeeper import Gatekeeper
from envoy_autoreload.generations import ConfigGeneration
from envoy_autoreload.lineage import Lineage
from envoy_autoreload.logs import log_event
from envoy_autoreload.ports import EnvoyFacts, Reactor
from envoy_autoreload.roster import Generation, Roster
from envoy_autoreload.settings import Settings
from envoy_autoreload.states import FORWARDS_SIGNALS, Timer

logger = logging.getLogger(__name__)

# ExitPolicy.exec_failed: epoch, reason, message, covers_seq, content, config.
ExecFailed = Callable[[int, str, str, int, Snapshot | None, ConfigGeneration | None], None]
envoy_logger = logging.getLogger("envoy_autoreload.envoy")
FIRST_PROBE_S: Final = 0.01
FIRST_PROBE_SHARE: Final = 0.85  # of the last start's spawn-to-LIVE time
FIRST_PROBE_MAX_S: Final = 0.2
FLAG_PROBE_S: Final = 0.003
FLAG_WATCH_S: Final = 0.5  # of a start: past that, a slow one is probed backing off


def next_probe_s(gen: Generation, elapsed: float) -> float:
    """Every 10 ms at first, backing off to 100 ms; every 3 ms for a while once its
    Envoy was seen holding the hot-restart flag. It clears that flag as it tells its
    parent to drain, ~2 ms after admin first says LIVE (ENVOY_FACTS §0, §2); while it
    holds it a probe is a read of shared memory, not a request (`family.is_live`), so
    the LIVE it then reports is seen within a few ms rather than up to a backed-off
    probe later."""
    if gen.saw_initializing and elapsed < FLAG_WATCH_S:
        return FLAG_PROBE_S
    return min(0.1, max(FIRST_PROBE_S, elapsed / 4))


class Launcher:
    def __init__(
        self,
        settings: Settings,
        reactor: Reactor,
        roster: Roster,
        family: EnvoyFacts,
        lineage: Lineage,
        current: Callable[[], Snapshot | None],
        gatekeeper: Gatekeeper,
    ) -> None:
        self._lineage = lineage
        self._current = current
        self._gatekeeper = gatekeeper  # the newest binary that passed its checks
        # What a start script that cannot be executed means (ExitPolicy, set once built).
        self.exec_failed: ExecFailed | None = None
        self._settings = settings
        self._reactor = reactor
        self._roster = roster
        self._family = family
        self._warned: set[str] = set()
        self._last_startup_s: float | None = None  # spawn to LIVE, the last epoch that made it

    def start(
        self,
        epoch: int,
        reason: str,
        *,
        parent: Generation | None = None,
        first: bool = False,
        covers_seq: int = 0,
        content: Snapshot | None = None,
        config: ConfigGeneration | None = None,
    ) -> None:
        """Start `epoch`; the first start's failure to execute the script is the
        daemon's (SpawnError), any later one the exit policy's."""
        if content is None and (config is None or self._lineage.matches_disk(config)):
            # What this epoch starts from; a burst that settles later and finds the
            # same content then restarts nothing. Cheap: unchanged files are not read.
            # (A snapshot other than what --config holds, a rollback's, is not what the
            # files hold: any request goes to the gate again.)
            content = self._current()
            # None while the files are first read: what it started from comes after.
            awaiting = content is None and self._roster.reference_pending
        else:
            awaiting = False
        try:
            self.spawn(
                epoch,
                reason,
                parent=parent,
                covers_seq=covers_seq,
                content=content,
                binary=self._gatekeeper.binary,
                config=config,
                awaiting_reference=awaiting,
            )
            self._lineage.started(config, epoch)
        except OSError as err:
            message = f"cannot execute start script {self._settings.start_script}: {err.strerror}"
            if first or self.exec_failed is None:
                raise SpawnError(message) from err
            self.exec_failed(epoch, reason, message, covers_seq, content, config)

    def spawn(
        self,
        epoch: int,
        reason: str,
        *,
        parent: Generation | None,
        covers_seq: int,
        content: Snapshot | None,
        binary: BinaryInfo | None,
        config: ConfigGeneration | None = None,
        awaiting_reference: bool = False,
    ) -> Generation:
        """Start the script at `epoch`; raises OSError when it cannot be executed."""
        if parent is not None and not self._roster.processes().started_ahead(epoch):
            # No child of ours is starting, so a set flag can only be a dead child's.
            # (One fired ahead is ours, starting: the flag was restored before it.)
            self._family.restore_flag(parent, epoch)
        gen = self._roster.spawn(
            epoch,
            reason,
            covers_seq=covers_seq,
            snapshot=content,
            binary=binary,
            config=config,
            awaiting_reference=awaiting_reference,
            retries_failed=self._lineage.failed(config),
        )
        fd = gen.process.stderr_fd()
        if fd is not None:
            self._reactor.add_reader(fd, gen)
        self._reactor.set_timeout(Timer.START_DEADLINE, self._settings.start_timeout_s)
        self._reactor.set_timeout(Timer.PROBE, self._first_probe_s())
        return gen

    def _first_probe_s(self) -> float:
        """Not before most of the last start's time: an Envoy is not LIVE sooner, and an
        early probe costs the Envoy that answers it. Its parent answers admin until the
        child shuts that down, about 0.75 of the way to LIVE (measured, 2 cores), and
        says LIVE, so `/server_info` (1.6 ms of its main thread, the one the child's
        hot-restart requests wait on) is asked of it; the child, while it loads, only
        `/ready` (admin.fetch_live_state)."""
        last = self._last_startup_s
        if last is None:
            return FIRST_PROBE_S
        return min(FIRST_PROBE_MAX_S, max(FIRST_PROBE_S, FIRST_PROBE_SHARE * last))

    def probe(self) -> Generation | None:
        """The starting generation if it is LIVE now; else the next probe is armed
        (every 10 ms at first, backing off to 100 ms)."""
        gen = self._roster.starting()
        if gen is None:
            return None
        self._family.observe(gen)
        if gen.envoy is not None and gen.envoy.pid != gen.pid:
            self._warn_once(
                "start_script.no_exec",
                "the start script runs Envoy as a child instead of exec'ing it: signals "
                "reach the shell, not Envoy; end the script with "
                '`exec envoy ... --restart-epoch "$RESTART_EPOCH"`',
                gen,
            )
        if self._family.is_live(gen):
            return gen
        elapsed = self._reactor.now() - gen.started_at
        self._reactor.set_timeout(Timer.PROBE, next_probe_s(gen, elapsed))
        return None

    def took_over(self, gen: Generation) -> bool:
        """Before giving a starting epoch up: did it go LIVE since the last probe, or
        tell its parent to drain (the flag is clear) while its admin is not where we
        ask? Killing it then would strand the parent, which refuses new connections
        once its child took over (REVIEW-core finding 3)."""
        self._family.observe(gen)
        if self._family.is_live(gen):
            return True
        if not self._family.handed_over(gen):
            return False
        log_event(
            logger,
            logging.WARNING,
            "child.admin_unreachable",
            f"epoch {gen.epoch} took over from its parent but its admin never reported "
            "LIVE where the daemon asks; counting it as serving. Check --admin-address "
            "and --config against what the start script gives Envoy",
            epoch=gen.epoch,
            pid=gen.pid,
            config=gen.config_short,
        )
        return True

    def give_up(self, gen: Generation) -> None:
        """--start-timeout ran out: KILL it (a child can wait for ever on an unresponsive
        parent, §7), never the parent."""
        reason = f"not LIVE within --start-timeout {self._settings.start_timeout_s:g} s"
        self._roster.mark_stopping(gen, reason)
        log_event(
            logger,
            logging.WARNING,
            "child.start_timeout",
            reason,
            epoch=gen.epoch,
            pid=gen.pid,
            config=gen.config_short,
        )
        gen.process.kill()

    def ended(self) -> None:
        """Nothing is starting any more (it went LIVE, or failed)."""
        self._reactor.cancel(Timer.PROBE)
        self._reactor.cancel(Timer.START_DEADLINE)

    def went_live(self, gen: Generation) -> None:
        self.ended()
        self._last_startup_s = self._reactor.now() - gen.started_at
        self._roster.went_live(gen)
        for mismatch in self._family.mismatches(gen):
            # What the daemon was told against what Envoy runs (/proc): a wrong --config
            # validates the wrong file and probes the wrong admin (finding 3).
            self._warn_once(
                "config.mismatch",
                f"{mismatch}: validation and LIVE checks may look at the wrong thing",
                gen,
            )
        trap = self._family.relative_names_trap(gen)
        if trap is not None:
            self._warn_once("config.relative_paths", trap, gen)
        self._check_snapshot_started(gen)
        if gen.marks.owes_sigusr1:
            # Replayed: a log rotation during the restart would otherwise leave the new
            # epoch writing to the rotated file (REVIEW-core finding 14).
            self._roster.owe_sigusr1(gen, False)
            gen.process.signal_envoy(signal.SIGUSR1, gen.envoy)
            log_event(
                logger,
                logging.INFO,
                "signal.forwarded",
                "SIGUSR1 that arrived while it started",
                signal="SIGUSR1",
                epochs=[gen.epoch],
                pids=[gen.pid],
            )

    def _check_snapshot_started(self, gen: Generation) -> None:
        """A drop-in script that starts the file on disk still works, but what starts
        is then only probably what was validated, and a rollback would start the bad
        files again: say so, and turn rollback off."""
        envoy, config = gen.envoy, gen.config
        if envoy is None or config is None or not envoy.command_line.config_path:
            return
        runs = envoy.resolve(envoy.command_line.config_path)
        if runs.resolve() == config.path.resolve():
            return
        self._lineage.script_ignores_snapshot = True
        self._warn_once(
            "start_script.no_snapshot",
            f"the start script starts {runs}, not $ENVOY_AUTORELOAD_SNAPSHOT: exact start "
            "of the validated config and rollback are off. Use "
            f'-c "${{ENVOY_AUTORELOAD_SNAPSHOT:-{runs}}}"',
            gen,
        )

    def pump_output(self, gen: Generation) -> None:
        """Pass on what the child wrote; with --log-format json each of Envoy's lines
        becomes an `envoy.output` event with its epoch and pid."""
        on_line = None
        if self._settings.log_format == "json":

            def on_line(line: str) -> None:
                log_event(
                    envoy_logger, logging.INFO, "envoy.output", line, epoch=gen.epoch, pid=gen.pid
                )

        if not gen.process.pump_stderr(on_line):
            fd = gen.process.stderr_fd()
            if fd is not None:
                self._reactor.remove_reader(fd)
            gen.process.close_stderr()

    def forward(self, signum: signal.Signals) -> None:
        # Not to a starting child: before Envoy installs its handlers, SIGUSR1's default
        # action would kill it (and a shell that did not exec dies of it, §11).
        targets = [g for g in self._roster.alive() if g.state in FORWARDS_SIGNALS]
        for gen in targets:
            gen.process.signal_envoy(signum, gen.envoy)
        starting = self._roster.starting()
        if starting is not None:
            # Replayed once it serves (REVIEW-core finding 14).
            self._roster.owe_sigusr1(starting, True)
        log_event(
            logger,
            logging.INFO,
            "signal.forwarded",
            signal=signum.name,
            epochs=[g.epoch for g in targets],
            pids=[g.pid for g in targets],
        )

    def rearm(self) -> None:
        """After a contained error, re-arm what a half-run handler may have left
        unarmed: the probe and deadline of a starting epoch, and one more decision."""
        if self._roster.starting() is not None:
            for timer, after_s in (
                (Timer.PROBE, 0.1),
                (Timer.START_DEADLINE, self._settings.start_timeout_s),
            ):
                if not self._reactor.has_deadline(timer):
                    self._reactor.set_timeout(timer, after_s)
        self._reactor.set_timeout(Timer.ADVANCE, 0.1)

    def _warn_once(self, event: str, message: str, gen: Generation) -> None:
        if event not in self._warned:
            self._warned.add(event)
            log_event(logger, logging.WARNING, event, message, epoch=gen.epoch, pid=gen.pid)
