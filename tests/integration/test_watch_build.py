"""Envoy first, hashing after (issue 16): no change made while the files are first read
is lost, and what inotify names updates the snapshot exactly as a full walk would.

Real files and real inotify. Where a test needs the hashing to be "still running", the
worker thread's `hash_listing` is held on an event the test releases: the only way to
put a write before or after the hashing of one file every time, on any machine.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from envoy_autoreload import digest
from envoy_autoreload.changed_since import COARSE_CLOCK_S, ChangedSince, mark_spawn
from envoy_autoreload.content import RootScan, Snapshot, digest_of_files
from envoy_autoreload.digest import ContentScanner, Listing, WatchRoot, hash_listing
from envoy_autoreload.errors import WatchLimitError
from envoy_autoreload.watch import Watcher, build, changes
from envoy_autoreload.watch.changes import ChangeDetector
from envoy_autoreload.watch.filters import NoiseFilter
from tests.helpers import wait_until
from tests.integration.watch_harness import next_burst

pytestmark = pytest.mark.skipif(
    os.uname().sysname != "Linux", reason="inotify: the daemon's watcher on Linux"
)


def _tree(top: Path, dirs: int = 5, files: int = 20) -> None:
    for d in range(dirs):
        (top / f"d{d}").mkdir(parents=True)
        for f in range(files):
            (top / f"d{d}" / f"f{f}.json").write_text(f'{{"d": {d}, "f": {f}}}\n')


def _detector(*roots: Path) -> ChangeDetector:
    return ChangeDetector(
        [WatchRoot(r) for r in roots],
        watcher_kind="inotify",
        ignore_globs=(),
        quiet_s=0.1,
        max_wait_s=2.0,
    )


def _fresh_digest(*roots: Path) -> Snapshot:
    return ContentScanner([WatchRoot(r) for r in roots], NoiseFilter()).scan()


class HeldHashing:
    """`hash_listing` on the worker thread waits for `release()`, before or after it
    reads the files."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, read_first: bool) -> None:
        self.gate = threading.Event()
        self.read = threading.Event()
        real = hash_listing

        def held(
            listing: Listing, cache: RootScan | None, changed: ChangedSince | None = None
        ) -> RootScan:
            if read_first:
                scan = real(listing, cache, changed)
                self.read.set()
                self.gate.wait(30)
                return scan
            self.read.set()
            self.gate.wait(30)
            return real(listing, cache, changed)

        monkeypatch.setattr(build, "hash_listing", held)


def _built(detector: ChangeDetector) -> Snapshot:
    found: list[Snapshot] = []

    def done() -> bool:
        reference = detector.take_built()
        if reference is not None:
            found.append(reference)
        return bool(found)

    wait_until(done, timeout_s=30, what="the background hashing to finish")
    return found[0]


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    top = tmp_path / "conf"
    _tree(top)
    (top / "envoy.yaml").write_text("version: 1\n")
    yield top


@pytest.mark.parametrize(
    "read_first", [True, False], ids=["hashed-then-changed", "changed-then-hashed"]
)
def test_changes_while_the_files_are_first_hashed_are_changes(
    tree: Path, monkeypatch: pytest.MonkeyPatch, read_first: bool
) -> None:
    """A file rewritten, one created and one deleted while the first hashing runs: each
    differs between the reference (what an Envoy started meanwhile may have read) and
    the files, whether the hashing read it before or after the change."""
    held = HeldHashing(monkeypatch, read_first=read_first)
    detector = _detector(tree)
    try:
        assert detector.start(degraded_ok=False, background=True) is None
        detector.start_building()  # as the daemon does once epoch 0 is spawned
        assert detector.building
        assert held.read.wait(30)
        (tree / "d1" / "f3.json").write_text('{"changed": true}\n')
        (tree / "d2" / "new.json").write_text("{}\n")
        (tree / "d3" / "f0.json").unlink()
        held.gate.set()
        reference = _built(detector)
        now = detector.current()
        changed = now.changed_since(reference)
        for path in ("d1/f3.json", "d2/new.json", "d3/f0.json"):
            assert str(tree / path) in changed, (path, changed)
        assert now.digest == _fresh_digest(tree).digest, "the files as they are now"
    finally:
        held.gate.set()
        detector.close()


def _older_than_the_margin(top: Path) -> None:
    """Wait until the clock is past the tree's newest ctime by the coarse clock's margin
    (`changed_since.py`): as a tree written long before the daemon started is."""
    newest = max(os.stat(p).st_ctime_ns for p in [top, *top.rglob("*")])
    margin_ns = int((COARSE_CLOCK_S + 0.02) * 1e9)
    wait_until(lambda: time.time_ns() > newest + margin_ns, timeout_s=5, what="time to pass")


def test_changes_between_the_spawn_and_the_walk_are_changes(tree: Path) -> None:
    """Epoch 0 is spawned before the walk (issue 16): a file rewritten, one created, one
    deleted and one renamed over (prepared before the spawn, as a config push stages
    it) after the spawn and before anything is watched raise no event, but each differs
    between the reference and the files, and a burst follows as if events had named
    them (no event ever will)."""
    (tree / "d4" / "staged.json").write_text('{"staged": true}\n')
    _older_than_the_margin(tree)
    spawned_ns = time.time_ns()
    (tree / "d1" / "f3.json").write_text('{"changed": true}\n')  # in place: d1 is as it was
    (tree / "d2" / "new.json").write_text("{}\n")
    (tree / "d3" / "f0.json").unlink()  # leaves no file: d3 itself moved
    (tree / "d4" / "f1.json").chmod(0o600)  # same bytes, but ctime cannot tell: changed
    os.replace(tree / "d4" / "staged.json", tree / "d4" / "f2.json")  # rename sets its ctime
    detector = _detector(tree)
    try:
        reference = _first_reading(detector, spawned_ns)
        changed = detector.current().changed_since(reference)
        for path in ("d1/f3.json", "d2/new.json", "d3", "d4/f2.json", "d4/f1.json"):
            assert str(tree / path) in changed, (path, changed)
        assert str(tree / "d0" / "f0.json") not in changed, "untouched files are no change"
        burst = next_burst(detector)
        assert burst is not None, "no event named them: the detector must settle a burst"
        assert {str(tree / p) for p in ("d1/f3.json", "d2/new.json", "d3")} <= burst.paths
    finally:
        detector.close()


def test_nothing_changed_since_the_spawn_means_the_reference_is_the_files(tree: Path) -> None:
    """No spurious restart: files last changed before the spawn (and its margin for the
    coarse clock) are what epoch 0 read, and the reference is exactly the content."""
    _older_than_the_margin(tree)
    spawned_ns = time.time_ns()
    detector = _detector(tree)
    try:
        reference = _first_reading(detector, spawned_ns)
        assert detector.current().digest == reference.digest
        assert next_burst(detector, timeout_s=0.5) is None
    finally:
        detector.close()


def test_a_symlinked_root_retargeted_between_the_spawn_and_the_walk_is_a_change(
    tmp_path: Path,
) -> None:
    """`--watch current` with `current -> rel1`, switched to an older `rel2` (a rollback
    by symlink) after the spawn, before the walk: the walk reads rel2 and no event
    names the switch, but the new link's ctime does (a resolution hop, `lstat`)."""
    for release in ("rel1", "rel2"):
        (tmp_path / release).mkdir()
        (tmp_path / release / "envoy.yaml").write_text(f"release: {release}\n")
    current = tmp_path / "current"
    current.symlink_to("rel1")
    _older_than_the_margin(tmp_path)
    spawned_ns = time.time_ns()  # epoch 0 read rel1
    (tmp_path / "next").symlink_to("rel2")
    os.replace(tmp_path / "next", current)
    detector = _detector(current)
    try:
        reference = _first_reading(detector, spawned_ns)
        assert detector.current().digest != reference.digest
        burst = next_burst(detector)
        assert burst is not None and str(current) in burst.paths, burst
    finally:
        detector.close()


def test_a_file_excluded_and_created_after_the_watch_restarts_nothing(tree: Path) -> None:
    """Envoy creates its `--admin-address-path` file in a watched directory once the walk
    has watched it: the directory was stat'ed right after its watch, before the file
    came, so the (excluded) event decides, and nothing changed."""
    _older_than_the_margin(tree)
    spawned_ns = time.time_ns()
    detector = _detector(tree)
    detector.exclude_paths([tree / "admin.addr"])

    def after_the_watch() -> None:
        _after_the_coarse_tick()
        (tree / "admin.addr").write_text("127.0.0.1:9901\n")

    try:
        reference = _first_reading(detector, spawned_ns, after_the_watch)
        assert detector.current().digest == reference.digest
        assert next_burst(detector, timeout_s=0.5) is None
    finally:
        detector.close()


def test_a_deletion_before_the_watch_stays_a_change_when_envoy_writes_there_after(
    tree: Path,
) -> None:
    """A directory keeps only its last change's time: a file deleted before the walk,
    then Envoy's own (excluded) file and an editor's swap file created there after the
    watch. The directory was stat'ed right after its watch, so the deletion counts."""
    _older_than_the_margin(tree)
    spawned_ns = time.time_ns()
    (tree / "d3" / "f0.json").unlink()  # Envoy read it; no watch on d3 yet
    detector = _detector(tree)
    detector.exclude_paths([tree / "d3" / "admin.addr"])

    def after_the_watch() -> None:
        _after_the_coarse_tick()
        (tree / "d3" / "admin.addr").write_text("127.0.0.1:9901\n")
        (tree / "d3" / ".f1.json.swp").write_text("vim\n")

    try:
        reference = _first_reading(detector, spawned_ns, after_the_watch)
        assert str(tree / "d3") in detector.current().changed_since(reference)
        burst = next_burst(detector)
        assert burst is not None and str(tree / "d3") in burst.paths, burst
    finally:
        detector.close()


def test_unwatched_a_change_since_the_spawn_is_still_a_change(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No inotify instance at all (`--watch-degraded`): the files are read after the
    spawn, and what changed since is UNKNOWN in the reference, so an operator's reload
    (which compares the files with it) restarts for it."""
    _older_than_the_margin(tree)
    spawned_ns = time.time_ns()
    (tree / "d1" / "f3.json").write_text('{"changed": true}\n')

    def no_instance(*_args: object) -> Watcher:
        raise WatchLimitError("inotify instances: the limit is reached")

    monkeypatch.setattr(changes, "open_watcher", no_instance)
    detector = _detector(tree)
    try:
        reference = detector.start(degraded_ok=True, background=True, changed_since_ns=spawned_ns)
        assert reference is not None
        assert str(tree / "d1" / "f3.json") in detector.current().changed_since(reference)
        assert str(tree / "d0" / "f0.json") not in detector.current().changed_since(reference)
    finally:
        detector.close()


def test_a_directory_above_a_root_swapped_between_the_spawn_and_the_walk_is_a_change(
    tmp_path: Path,
) -> None:
    """`--watch app/conf`, and a deploy swaps `app` itself (`mv app app.old; mv app.new
    app`) after the spawn, before the walk: nothing under the root has a new ctime, but
    the root resolves to another directory than just before the spawn."""
    for name, body in (("app", "v1"), ("app.new", "v2")):
        (tmp_path / name / "conf").mkdir(parents=True)
        (tmp_path / name / "conf" / "envoy.yaml").write_text(f"version: {body}\n")
    _older_than_the_margin(tmp_path)
    root = tmp_path / "app" / "conf"
    detector = _detector(root)
    mark = mark_spawn(detector.root_paths())  # as the daemon does just before the spawn
    detector.remember_roots(mark.roots, mark.listings)
    spawned_ns = mark.wall_ns
    os.rename(tmp_path / "app", tmp_path / "app.old")
    os.rename(tmp_path / "app.new", tmp_path / "app")
    try:
        reference = _first_reading(detector, spawned_ns)
        assert detector.current().digest != reference.digest
        burst = next_burst(detector)
        assert burst is not None and str(root) in burst.paths, burst
    finally:
        detector.close()


def test_unwatched_a_deletion_between_the_listing_and_the_reading_is_a_change(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a watch, nothing reports a file deleted after the walk listed its
    directory and before it was read: the directories are stat'ed again afterwards."""
    _older_than_the_margin(tree)
    spawned_ns = time.time_ns()
    real = digest.hash_listing

    def deleting_first(
        listing: Listing, cache: RootScan | None, changed: ChangedSince | None = None
    ) -> RootScan:
        (tree / "d1" / "f3.json").unlink(missing_ok=True)
        return real(listing, cache, changed)

    def no_instance(*_args: object) -> Watcher:
        raise WatchLimitError("inotify instances: the limit is reached")

    monkeypatch.setattr(digest, "hash_listing", deleting_first)
    monkeypatch.setattr(changes, "open_watcher", no_instance)
    detector = _detector(tree)
    try:
        reference = detector.start(degraded_ok=True, background=True, changed_since_ns=spawned_ns)
        assert reference is not None
        assert str(tree / "d1") in detector.current().changed_since(reference)
    finally:
        detector.close()


def _first_reading(
    detector: ChangeDetector, spawned_ns: int, after_the_walk: Callable[[], None] | None = None
) -> Snapshot:
    """The first walk and reading after epoch 0's spawn, as the daemon runs them; the
    reference they give (what epoch 0 may have read)."""
    assert detector.start(degraded_ok=False, background=True, changed_since_ns=spawned_ns) is None
    if after_the_walk is not None:
        after_the_walk()
    detector.start_building()
    return _built(detector)


def _after_the_coarse_tick() -> None:
    """Wait until a file time written now is later than any wall time read before."""
    before = time.time_ns()
    wait_until(
        lambda: time.time_ns() > before + int(COARSE_CLOCK_S * 1e9),
        timeout_s=5,
        what="the coarse clock to move on",
    )


def test_nothing_changed_while_hashing_means_the_reference_is_the_files(tree: Path) -> None:
    """No spurious restart: untouched, the reference is exactly the content."""
    detector = _detector(tree, tree / "envoy.yaml")
    try:
        detector.start(degraded_ok=False, background=True)
        detector.start_building()
        reference = _built(detector)
        assert detector.current().digest == reference.digest
        assert reference.digest == _fresh_digest(tree, tree / "envoy.yaml").digest
        assert reference.file_count == 101
    finally:
        detector.close()


def test_a_shared_path_digests_the_same_from_the_handed_over_files(tree: Path) -> None:
    """`--config` inside a `--watch` directory is in two roots: the digest counts it
    once, as `files` lists it, so a re-exec's new image (which gets `files`) computes
    the same digest and restarts nothing (a bug found on the way: it restarted)."""
    snapshot = _fresh_digest(tree, tree / "envoy.yaml")
    assert digest_of_files(dict(snapshot.files)) == snapshot.digest
    assert snapshot.file_count == len(snapshot.files) == 101


Operation = Callable[[random.Random, Path], None]


def _write(rng: random.Random, top: Path) -> None:
    files = sorted(p for p in top.rglob("*") if p.is_file() and not p.is_symlink())
    if files:
        rng.choice(files).write_text(f"{rng.random()}\n")


def _create(rng: random.Random, top: Path) -> None:
    dirs = [top, *sorted(p for p in top.rglob("*") if p.is_dir() and not p.is_symlink())]
    (rng.choice(dirs) / f"n{rng.randrange(10**6)}.json").write_text("{}\n")


def _delete(rng: random.Random, top: Path) -> None:
    files = sorted(p for p in top.rglob("*") if p.is_file() or p.is_symlink())
    if files:
        rng.choice(files).unlink()


def _new_tree(rng: random.Random, top: Path) -> None:
    staged = top.parent / f"staged{rng.randrange(10**6)}"
    _tree(staged, dirs=2, files=3)
    os.rename(staged, top / staged.name)


def _remove_tree(rng: random.Random, top: Path) -> None:
    dirs = sorted(p for p in top.iterdir() if p.is_dir() and not p.is_symlink())
    if dirs:
        shutil.rmtree(rng.choice(dirs))


def _rename_tree(rng: random.Random, top: Path) -> None:
    dirs = sorted(p for p in top.iterdir() if p.is_dir() and not p.is_symlink())
    if dirs:
        os.rename(rng.choice(dirs), top / f"moved{rng.randrange(10**6)}")


def _link(rng: random.Random, top: Path) -> None:
    dirs = sorted(p for p in top.iterdir() if p.is_dir() and not p.is_symlink())
    if dirs:
        (top / f"link{rng.randrange(10**6)}").symlink_to(rng.choice(dirs))


def _link_file(rng: random.Random, top: Path) -> None:
    files = sorted(p for p in top.rglob("*.json") if p.is_file() and not p.is_symlink())
    if files:
        (top / f"flink{rng.randrange(10**6)}.json").symlink_to(rng.choice(files))


def _dangling_then_made(rng: random.Random, top: Path) -> None:
    """A link to a name that does not exist yet, then (sometimes) the name."""
    target = top / f"later{rng.randrange(10)}"
    (top / f"dlink{rng.randrange(10**6)}").symlink_to(target)
    if rng.random() < 0.5 and not target.exists():
        _tree(target, dirs=1, files=2)


OPERATIONS: tuple[Operation, ...] = (
    _write, _write, _create, _delete, _new_tree, _remove_tree, _rename_tree, _link,
    _link_file, _dangling_then_made,
)  # fmt: skip


@pytest.mark.parametrize("seed", range(1, 7))
def test_what_events_name_keeps_the_snapshot_equal_to_a_full_walk(tree: Path, seed: int) -> None:
    """Random edits, a few per burst: after each burst the snapshot updated from the
    named paths alone has the digest a fresh walk of the same files has."""
    rng = random.Random(seed)
    detector = _detector(tree, tree / "envoy.yaml")
    try:
        detector.start(degraded_ok=False)
        for _round in range(15):
            for _op in range(rng.randint(1, 4)):
                rng.choice(OPERATIONS)(rng, tree)
            burst = next_burst(detector)
            assert burst is not None, "no change was seen"
            fresh = _fresh_digest(tree, tree / "envoy.yaml")
            assert burst.snapshot.digest == fresh.digest, sorted(
                burst.snapshot.changed_since(fresh)
            )
            assert burst.snapshot.file_count == fresh.file_count
            assert dict(burst.snapshot.files) == dict(fresh.files)
            assert burst.snapshot.directories == fresh.directories
    finally:
        detector.close()


def test_a_burst_is_applied_in_slices_that_stop_on_time(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16, goal 5: each turn applies named paths for `APPLY_SLICE_S`, checking the
    clock at every path (it used to check only every 256 paths, and on a slow VM one
    chunk took a turn past 50 ms). A clock that moves 1 ms per look lets a 10 ms slice
    take about ten paths; and the slices, however short, end on the content a walk
    finds, new directories included."""
    detector = _detector(tree, tree / "envoy.yaml")
    try:
        detector.start(degraded_ok=False)
        for d in range(3):
            (tree / f"new{d}").mkdir()
            for f in range(100):
                (tree / f"new{d}" / f"f{f}.json").write_text(f"{d}.{f}")
        for f in range(200):
            (tree / "d0" / f"g{f}.json").write_text(str(f))
        ticks = iter(range(10**9))
        monkeypatch.setattr(time, "monotonic", lambda: next(ticks) / 1000)
        detector.on_readable(0.0)  # every event read; one slice applied
        slices = 1
        while detector.applied is None:
            detector.settle(0.0)  # not due yet: one slice more
            slices += 1
            assert slices < 1000, "the slices make no progress"
        assert slices >= 20, f"{slices} slices for ~500 paths: a slice overran its time"
        fresh = _fresh_digest(tree, tree / "envoy.yaml")
        assert detector.applied.digest == fresh.digest
        assert dict(detector.applied.files) == dict(fresh.files)
    finally:
        detector.close()


def test_a_directory_envoy_only_wrote_its_own_file_in_is_no_change(tmp_path: Path) -> None:
    """`--admin-address-path` in a watched directory: epoch 0 creates the file before the
    walk reaches the directory (the more so when it was spawned before the daemon had
    loaded, head_start.py), which moves the directory's ctime. Its entries as they were
    just before the spawn tell that from a deletion made in the same window."""
    written = tmp_path / "admin-address.txt"
    (tmp_path / "envoy.yaml").write_text("a\n")
    (tmp_path / "old.yaml").write_text("b\n")
    _older_than_the_margin(tmp_path)
    mark = mark_spawn([tmp_path], [written])
    written.write_text("127.0.0.1:9901\n")  # what Envoy does as it starts

    def noted() -> set[str]:
        since = ChangedSince(
            mark.wall_ns, listings=mark.listings, excluded=frozenset({str(written)})
        )
        since.note_watched(str(tmp_path), follow=True)
        since.note_hop(tmp_path.parent, tmp_path.name)  # a root is a hop of its parent
        return since.paths

    assert noted() == set()
    unlisted = ChangedSince(mark.wall_ns, excluded=frozenset({str(written)}))
    unlisted.note_watched(str(tmp_path), follow=True)
    assert unlisted.paths == {str(tmp_path)}, "without the listing it reads as a change"
    (tmp_path / "old.yaml").unlink()
    assert noted() == {str(tmp_path)}, "a deletion behind Envoy's own file was hidden"
