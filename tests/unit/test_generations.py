"""Generation store: exact snapshots, history that survives restarts, one daemon per dir."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from envoy_autoreload import generations
from envoy_autoreload.generations import (
    ConfigGeneration,
    GenerationStore,
    Outcome,
    StateDirError,
)
from envoy_autoreload.lineage import Lineage
from tests.helpers import wait_until

CONFIG = b"static_resources: {}\n"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state: Path) -> Iterator[GenerationStore]:
    with GenerationStore.open(state, keep=3, suffix=".yaml") as s:
        yield s


def _leftovers(store: GenerationStore) -> list[str]:
    names = os.listdir(store.snapshot_dir) + os.listdir(store.state_dir)
    return [n for n in names if n.endswith(".tmp")]


def _gens(store: GenerationStore, n: int) -> list[ConfigGeneration]:
    return [store.snapshot(f"config {i}\n".encode()) for i in range(n)]


# -- snapshots -----------------------------------------------------------------------


def test_snapshot_is_read_only_and_byte_for_byte(store: GenerationStore) -> None:
    gen = store.snapshot(CONFIG)
    assert gen.sha256 == hashlib.sha256(CONFIG).hexdigest()
    assert gen.path == store.state_dir / "generations" / f"{gen.sha256}.yaml"
    assert gen.path.read_bytes() == CONFIG
    assert stat.S_IMODE(gen.path.stat().st_mode) == 0o444
    assert stat.S_IMODE(store.state_dir.stat().st_mode) == 0o750
    assert _leftovers(store) == []


def test_a_snapshot_is_recorded_once_synced_and_at_close(state: Path) -> None:
    """Pinning writes the snapshot without waiting for the disk (a restart's critical
    path); the start's outcome syncs it (LIVE: `Lineage.sync`), and so does closing the
    store: either way a later daemon's history names it, and never before its bytes
    were synced."""
    with GenerationStore.open(state, keep=3, suffix=".yaml") as store:
        first = store.snapshot(CONFIG)
        assert not (state / "history.json").exists(), "nothing written before the start"
        store.sync()
        assert first.sha256 in (state / "history.json").read_text()
        second = store.snapshot(b"other: {}\n")
    with GenerationStore.open(state, keep=3, suffix=".yaml") as again:
        assert again.get(first.sha256) == first
        assert again.get(second.sha256) == second
        assert {e.sha256 for e in again.history()} >= {first.sha256, second.sha256}


def test_a_snapshot_starts_to_reach_the_disk_off_the_loop(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16, goal 5: a 5 MB snapshot's fsync cost 35-60 ms of loop time when it was
    first asked for at `sync`. A thread of its own fsyncs it as soon as it is written,
    so the loop's `sync` finds nothing left to write."""
    synced_off_the_loop: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            synced_off_the_loop.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with GenerationStore.open(state, keep=3, suffix=".yaml") as store:
        gen = store.snapshot(CONFIG)
        wait_until(
            lambda: str(gen.path) in synced_off_the_loop,
            timeout_s=10.0,
            what="the snapshot fsynced by a thread",
        )
        assert not (state / "history.json").exists(), "the history waits for `sync`"


@pytest.mark.parametrize("suffix", [".json", ".yml", ".pb"])
def test_snapshot_keeps_the_config_suffix(state: Path, suffix: str) -> None:
    with GenerationStore.open(state, keep=3, suffix=suffix) as store:
        assert store.snapshot(CONFIG).path.name.endswith(suffix)


def test_snapshot_is_idempotent_and_keeps_the_outcome(store: GenerationStore) -> None:
    first = store.snapshot(CONFIG)
    store.record(first, Outcome.FAILED, detail="probation failed")
    inode = first.path.stat().st_ino
    again = store.snapshot(CONFIG)
    assert again == first
    assert first.path.stat().st_ino == inode  # reused, not rewritten
    assert store.outcome(first.sha256) is Outcome.FAILED
    assert len(store.history()) == 1
    assert store.warnings == []


def test_a_tampered_snapshot_is_rewritten(store: GenerationStore) -> None:
    gen = store.snapshot(CONFIG)
    gen.path.chmod(0o644)
    gen.path.write_bytes(b"static_resources: {listeners: []}\n")
    assert store.snapshot(CONFIG) == gen
    assert gen.path.read_bytes() == CONFIG
    assert stat.S_IMODE(gen.path.stat().st_mode) == 0o444
    assert len(store.warnings) == 1
    assert "rewritten" in store.warnings[0]


def test_new_bytes_start_validated(store: GenerationStore) -> None:
    gen = store.snapshot(CONFIG)
    (entry,) = store.history()
    assert entry.outcome is Outcome.VALIDATED
    assert entry.sha256 == gen.sha256
    assert entry.epoch is None


def test_get_needs_the_snapshot_file(store: GenerationStore) -> None:
    gen = store.snapshot(CONFIG)
    assert store.get(gen.sha256) == gen
    assert store.get("0" * 64) is None
    assert store.get("../../etc/passwd") is None
    gen.path.unlink()
    assert store.get(gen.sha256) is None


# -- history -------------------------------------------------------------------------


def test_history_survives_close_and_reopen(state: Path) -> None:
    with GenerationStore.open(state, keep=3, suffix=".yaml") as store:
        gen = store.snapshot(CONFIG)
        store.record(gen, Outcome.GOOD, epoch=3)
    doc = json.loads((state / "history.json").read_text())
    assert doc["version"] == 1
    assert doc["generations"][0]["outcome"] == "good"
    with GenerationStore.open(state, keep=3, suffix=".yaml") as store:
        assert store.warnings == []
        assert store.outcome(gen.sha256) is Outcome.GOOD
        assert store.history()[0].epoch == 3
        assert store.last_good() == gen
    assert _leftovers(store) == []


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"version": 99, "generations": []}',
        '{"version": 1, "generations": [{"sha256": "abc"}]}',
        '{"version": 1, "generations": [{"sha256": "' + "a" * 64 + '", "outcome": "meh", '
        '"created_at": 1, "updated_at": 1, "epoch": null, "detail": null}]}',
    ],
)
def test_corrupt_history_is_set_aside_with_a_warning(state: Path, text: str) -> None:
    state.mkdir()
    (state / "history.json").write_text(text)
    with GenerationStore.open(state, keep=3, suffix=".yaml") as store:
        assert store.history() == []
        (warning,) = store.warnings
        assert "history.json.corrupt" in warning
        assert "\n" not in warning
    assert (state / "history.json.corrupt").read_text() == text
    assert not (state / "history.json").exists()


def test_record_of_an_unknown_generation_creates_its_entry(store: GenerationStore) -> None:
    gen = ConfigGeneration("b" * 64, store.snapshot_dir / ("b" * 64 + ".yaml"))
    store.record(gen, Outcome.FAILED, epoch=7, detail="rolled back to 1234")
    (entry,) = store.history()
    assert (entry.sha256, entry.outcome, entry.epoch, entry.detail) == (
        "b" * 64,
        Outcome.FAILED,
        7,
        "rolled back to 1234",
    )


def test_record_keeps_the_epoch_when_none_is_given(store: GenerationStore) -> None:
    gen = store.snapshot(CONFIG)
    store.record(gen, Outcome.PROBATION, epoch=4)
    store.record(gen, Outcome.GOOD)
    (entry,) = store.history()
    assert (entry.outcome, entry.epoch) == (Outcome.GOOD, 4)
    assert entry.updated_at > entry.created_at


def test_history_is_newest_first(store: GenerationStore) -> None:
    a, b, c = _gens(store, 3)
    store.record(a, Outcome.PROBATION)
    assert [e.sha256 for e in store.history()] == [a.sha256, c.sha256, b.sha256]


def test_last_good_picks_the_newest_good(store: GenerationStore) -> None:
    a, b, c = _gens(store, 3)
    assert store.last_good() is None
    store.record(b, Outcome.GOOD)
    store.record(a, Outcome.GOOD)
    store.record(c, Outcome.FAILED)
    assert store.last_good() == a
    a.path.unlink()  # a GOOD without its snapshot cannot be rolled back to
    assert store.last_good() == b


def test_stamps_never_go_backwards(store: GenerationStore, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _gens(store, 2)
    store.record(a, Outcome.GOOD)
    monkeypatch.setattr("time.time", lambda: 1000.0)  # clock stepped back
    store.record(b, Outcome.GOOD)
    assert store.last_good() == b


# -- find ----------------------------------------------------------------------------


def test_find_by_prefix(store: GenerationStore) -> None:
    gen = store.snapshot(CONFIG)
    assert store.find(gen.sha256[:4]) == gen
    assert store.find(gen.short.upper()) == gen
    assert store.find(gen.sha256) == gen


def test_find_ambiguous_lists_the_candidates(store: GenerationStore) -> None:
    data = _colliding(4)
    first, second = (store.snapshot(d) for d in data)
    with pytest.raises(LookupError, match="ambiguous") as info:
        store.find(first.sha256[:4])
    assert first.short in str(info.value)
    assert second.short in str(info.value)
    assert store.find(first.sha256[:12]) == first


def test_find_none_and_too_short(store: GenerationStore) -> None:
    gen = store.snapshot(CONFIG)
    other = "0000" if not gen.sha256.startswith("0000") else "1111"
    with pytest.raises(LookupError, match="no kept generation"):
        store.find(other)
    with pytest.raises(LookupError, match="at least 4"):
        store.find(gen.sha256[:3])
    with pytest.raises(LookupError, match="at least 4"):
        store.find("xyzw")
    gen.path.unlink()
    with pytest.raises(LookupError, match="no kept generation"):
        store.find(gen.sha256[:8])


def _colliding(width: int) -> tuple[bytes, bytes]:
    """Two configs whose sha256 share their first `width` hex characters."""
    seen: dict[str, bytes] = {}
    i = 0
    while True:
        data = f"config {i}\n".encode()
        prefix = hashlib.sha256(data).hexdigest()[:width]
        if prefix in seen:
            return seen[prefix], data
        seen[prefix] = data
        i += 1


# -- prune ---------------------------------------------------------------------------


def test_prune_keeps_n_newest_plus_pinned_and_last_good(store: GenerationStore) -> None:
    gens = _gens(store, 7)  # keep=3
    store.record(gens[0], Outcome.GOOD)
    store.record(gens[1], Outcome.FAILED)  # newer than gens[0]: gens[0] is still last good
    for g in gens[4:]:
        store.record(g, Outcome.VALIDATED)
    store.prune(pinned={gens[2].sha256})
    kept = {e.sha256 for e in store.history()}
    newest = {g.sha256 for g in gens[4:]}
    assert kept == newest | {gens[0].sha256, gens[2].sha256}
    for g in gens:
        assert g.path.exists() == (g.sha256 in kept)
    assert store.last_good() == gens[0]


def test_prune_is_persisted_and_removes_crash_leftovers(state: Path) -> None:
    with GenerationStore.open(state, keep=2, suffix=".yaml") as store:
        gens = _gens(store, 4)
        (store.snapshot_dir / f".{gens[0].sha256}.yaml.abc123.tmp").write_bytes(b"half")
        (state / ".history.json.xyz.tmp").write_text("{")
        (store.snapshot_dir / ("c" * 64 + ".yaml")).write_bytes(b"orphan")
        (store.snapshot_dir / "README").write_text("not ours")
        store.prune(pinned=set())
        assert _leftovers(store) == []
        assert sorted(os.listdir(store.snapshot_dir)) == sorted(
            ["README", gens[2].path.name, gens[3].path.name]
        )
    with GenerationStore.open(state, keep=2, suffix=".yaml") as store:
        assert {e.sha256 for e in store.history()} == {gens[2].sha256, gens[3].sha256}


# -- the state directory -------------------------------------------------------------


def test_second_open_of_one_dir_names_the_holder(state: Path) -> None:
    with GenerationStore.open(state, keep=3, suffix=".yaml"):
        with pytest.raises(StateDirError) as info:
            GenerationStore.open(state, keep=3, suffix=".yaml")
        message = str(info.value)
        assert f"PID {os.getpid()}" in message
        assert str(state) in message
        assert "\n" not in message
    GenerationStore.open(state, keep=3, suffix=".yaml").close()  # released on close


def test_a_file_in_the_way_is_one_line(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(StateDirError) as info:
        GenerationStore.open(afile, keep=3, suffix=".yaml")
    assert str(afile) in str(info.value)
    assert "not a directory" in str(info.value)
    assert "\n" not in str(info.value)


def test_an_uncreatable_dir_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    target = tmp_path / "afile" / "state"
    with pytest.raises(StateDirError) as info:
        GenerationStore.open(target, keep=3, suffix=".yaml")
    message = str(info.value)
    assert str(target) in message
    assert "Not a directory" in message  # strerror, not a repr
    assert "Errno" not in message
    assert "\n" not in message


def test_a_file_where_the_snapshot_dir_goes(state: Path) -> None:
    state.mkdir()
    (state / "generations").write_text("")
    with pytest.raises(StateDirError, match="not a directory"):
        GenerationStore.open(state, keep=3, suffix=".yaml")
    (state / "generations").unlink()
    GenerationStore.open(state, keep=3, suffix=".yaml").close()  # the lock was released


# -- staged snapshots (a check started ahead of its burst) ----------------------------


def test_a_staged_snapshot_has_no_history_until_pinned_and_survives_prune(
    store: GenerationStore, tmp_path: Path
) -> None:
    """`Lineage.stage` writes the bytes a check ahead validates, with no history entry
    (the burst may move on); prune keeps that file while it is staged, and the later
    pin of the same bytes records them."""
    config = tmp_path / "envoy.yaml"
    config.write_bytes(CONFIG)
    lineage = Lineage(store, config.read_bytes)
    staged = lineage.stage()
    assert staged is not None and staged.path.read_bytes() == CONFIG
    assert store.outcome(staged.sha256) is None, "a staged snapshot is in the history"
    lineage.prune([])
    assert staged.path.exists(), "prune removed the snapshot a check ahead reads"
    pinned = lineage.pin()
    assert pinned == staged
    assert store.outcome(staged.sha256) is Outcome.VALIDATED


def test_close_waits_for_the_early_write_back(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot's fsync on its own thread (`_write_back_early`) still running when the
    store closes: the daemon's exit (and a test's leak check) must not leave it behind."""
    release = threading.Event()
    real_fsync = generations._fsync_file

    def slow_on_the_thread(path: Path) -> None:
        if threading.current_thread().name == "snapshot-fsync":
            release.wait(10)
        real_fsync(path)

    monkeypatch.setattr(generations, "_fsync_file", slow_on_the_thread)
    timer = threading.Timer(0.2, release.set)
    with GenerationStore.open(state, keep=3, suffix=".yaml") as store:
        store.snapshot(CONFIG)
        timer.start()
    timer.join()
    running = [t for t in threading.enumerate() if t.name == "snapshot-fsync"]
    assert not running, "close() returned with the write-back still running"
