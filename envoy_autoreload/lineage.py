"""Which config generation each start uses, and which one is good: the core's side of
the generation store (`generations.py`).

A start always names its snapshot: a validated one for a requested restart, the last
good one for a rollback or a recovery. Nothing the core starts is read from the files
on disk once generations are on, so a crash of a bad push cold-starts the last good
config rather than the bad one again (REVIEW-core finding 8a), and a change made while
the gate runs cannot slip in between the verdict and the start (finding 8b).

Generations are off (every method a no-op, `pin()` None) without --config or when the
state directory cannot be used; the daemon then starts what is on disk, as before.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterable

from envoy_autoreload.generations import (
    ConfigGeneration,
    GenerationStore,
    Outcome,
    StateDirError,
)
from envoy_autoreload.logs import log_event
from envoy_autoreload.settings import Settings

logger = logging.getLogger(__name__)


class Lineage:
    def __init__(self, store: GenerationStore | None, read_config: Callable[[], bytes]) -> None:
        self._store = store
        self._read_config = read_config
        self.last_started: ConfigGeneration | None = None
        self.serving: ConfigGeneration | None = None  # what the newest LIVE epoch runs
        self.script_ignores_snapshot = False  # its Envoy runs -c of the files on disk
        self.rolled_back_from: ConfigGeneration | None = None
        self._write_warned = False
        self.to_announce: list[Callable[[], None]] = []
        self.staged: ConfigGeneration | None = None  # a check ahead may be reading it

    def announce(self) -> None:
        """Say whether generations are on, once the start-up checks passed."""
        for say in self.to_announce:
            say()
        self.to_announce.clear()

    @property
    def enabled(self) -> bool:
        return self._store is not None

    def pin(self) -> ConfigGeneration | None:
        """Snapshot --config as it is now, before it is validated: the verdict and the
        start are then about these bytes, whatever the file does meanwhile. None when
        generations are off or the file cannot be read (validating it says why)."""
        return self._snapshot(record=True)

    def stage(self) -> ConfigGeneration | None:
        """`pin` for a check started ahead of its burst: the snapshot file without a
        history entry (the burst may move on), kept from `prune` until the next
        `stage`. The later `pin` of the same bytes finds the file and records them."""
        self.staged = self._snapshot(record=False)
        return self.staged

    def _snapshot(self, *, record: bool) -> ConfigGeneration | None:
        store = self._store
        if store is None:
            return None
        try:
            data = self._read_config()
        except OSError:
            return None
        try:
            return store.snapshot(data, record=record)
        except OSError as err:
            self._warn_write(f"cannot write a config snapshot: {err.strerror or err}")
            return None

    def matches_disk(self, config: ConfigGeneration) -> bool:
        """Whether --config on disk holds exactly this snapshot's bytes (then the
        watched files are what it runs: the rest is never snapshotted)."""
        try:
            data = self._read_config()
        except OSError:
            return False
        return hashlib.sha256(data).hexdigest() == config.sha256

    def failed(self, config: ConfigGeneration | None) -> bool:
        """These bytes failed probation: not tried again until they change."""
        store = self._store
        return (
            store is not None
            and config is not None
            and (store.outcome(config.sha256) is Outcome.FAILED)
        )

    def outcome(self, config: ConfigGeneration | None) -> Outcome | None:
        if self._store is None or config is None:
            return None
        return self._store.outcome(config.sha256)

    def get(self, sha256: str | None) -> ConfigGeneration | None:
        """A stored generation by its full hash (a re-exec names them so)."""
        if self._store is None or sha256 is None:
            return None
        return self._store.get(sha256)

    def last_good(self) -> ConfigGeneration | None:
        return self._store.last_good() if self._store is not None else None

    def find(self, prefix: str) -> ConfigGeneration:
        """A stored generation by hash prefix; LookupError (one line) otherwise."""
        if self._store is None:
            raise LookupError("generations are off (no --config, or no usable --state-dir)")
        return self._store.find(prefix)

    def recovery_target(self) -> ConfigGeneration | None:
        """What a respawn or cold start after a crash starts: what served, unless it
        failed probation, else the last good one; never one that failed. None leaves
        the start script to its own default (generations off, or nothing ever ran)."""
        for candidate in (self.serving, self.last_good(), self.last_started):
            if candidate is not None and not self.failed(candidate):
                return candidate
        return None

    def record(
        self,
        config: ConfigGeneration | None,
        outcome: Outcome,
        *,
        epoch: int | None = None,
        detail: str | None = None,
    ) -> None:
        store = self._store
        if store is None or config is None:
            return
        try:
            store.record(config, outcome, epoch=epoch, detail=detail)
        except OSError as err:
            self._warn_write(f"cannot write history: {err.strerror or err}")

    def started(self, config: ConfigGeneration | None, epoch: int) -> None:
        """After the spawn. Nothing is written here: four fsyncs (the snapshot, its
        directory, the history and its directory) right after the spawn shared the two
        cores with the Envoy starting, which then served ~1 ms later (bench/README.md,
        issue 16 goal 4). The start's outcome (`record`: LIVE, probation, a failure)
        makes the snapshot durable and then the history that names it; `sync` covers a
        LIVE that records nothing, and closing the store a stop in between."""
        if config is not None:
            self.last_started = config

    def sync(self) -> None:
        """What `pin` wrote, made durable (`GenerationStore.sync`): a no-op once a
        record after the start did it."""
        store = self._store
        if store is None:
            return
        try:
            store.sync()
        except OSError as err:
            self._warn_write(f"cannot write a config snapshot: {err.strerror or err}")

    def prune(self, pinned: Iterable[ConfigGeneration | None]) -> None:
        store = self._store
        if store is None:
            return
        keep = {c.sha256 for c in (*pinned, self.staged) if c is not None}
        try:
            store.prune(keep)
        except OSError as err:
            self._warn_write(f"cannot prune old generations: {err.strerror or err}")

    def history(self) -> list[dict[str, object]]:
        if self._store is None:
            return []
        return [
            {
                "sha256": e.sha256,
                "short": e.short,
                "created_at": e.created_at,
                "updated_at": e.updated_at,
                "outcome": e.outcome.value,
                "epoch": e.epoch,
                "detail": e.detail,
            }
            for e in self._store.history()
        ]

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def _warn_write(self, message: str) -> None:
        """Once: a full disk must not fill the log, nor stop Envoy."""
        if self._write_warned:
            return
        self._write_warned = True
        log_event(logger, logging.WARNING, "generations.write_failed", message)


def open_lineage(settings: Settings) -> Lineage:
    """Generations on when there is a --config and a usable state directory; otherwise
    one line says what is off, and the daemon runs on as before. What it says waits for
    `announce()`: a start-up refusal is one line, not a daemon telling its plans first."""
    config, state_dir = settings.config, settings.state_dir
    if config is None or state_dir is None:
        lineage = Lineage(None, bytes)
        if settings.health_urls:
            off = (
                "--health-url needs --config (probation and rollback work on config "
                "generations): the URLs are not checked"
            )
            lineage.to_announce.append(_say(logging.WARNING, "generations.off", off))
        return lineage
    try:
        store = GenerationStore.open(
            state_dir, keep=settings.keep_generations, suffix=config.suffix or ".yaml"
        )
    except StateDirError as err:
        lineage = Lineage(None, bytes)
        off = (
            f"{err}; running without config history, exact start, probation and "
            "rollback (give --state-dir DIR)"
        )
        lineage.to_announce.append(_say(logging.WARNING, "generations.off", off))
        return lineage
    lineage = Lineage(store, config.read_bytes)
    for warning in store.warnings:
        lineage.to_announce.append(_say(logging.WARNING, "generations.repaired", warning))
    on = functools.partial(
        log_event,
        logger,
        logging.INFO,
        "generations.on",
        state_dir=str(state_dir),
        last_good=_short(store.last_good()),
        health_window_s=settings.health_window_s,
    )
    lineage.to_announce.append(on)
    return lineage


def _say(level: int, event: str, message: str) -> Callable[[], None]:
    return functools.partial(log_event, logger, level, event, message)


def _short(config: ConfigGeneration | None) -> str | None:
    return config.short if config is not None else None
