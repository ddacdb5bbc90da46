"""The content scanner's bounds and its stat cache, on real files (review #12, #13, #15).

Whether the scanner read a file again or trusted its cache is observed from outside, as
the kernel sees it: an inotify IN_OPEN watch on the file (inotify(7)), not a counter
inside the code under test.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from envoy_autoreload.digest import (
    MAX_LINKED_ENTRIES,
    RACY_WINDOW_S,
    ContentScanner,
    Snapshot,
    WatchRoot,
    can_cache_hash,
    sha256_of,
)
from envoy_autoreload.watch.filters import NoiseFilter
from tests.helpers import wait_until
from tests.integration.watch_harness import deep_tree

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify only")

HOUR_NS = 3600 * 1_000_000_000


def _scanner(*roots: Path) -> ContentScanner:
    return ContentScanner([WatchRoot(r) for r in roots], NoiseFilter())


def _opens_during(path: Path, action: Callable[[], object]) -> int:
    """How many times `path` was opened while `action` ran, as inotify reports it."""
    import inotify_simple

    with inotify_simple.INotify(nonblocking=True) as inotify:
        inotify.add_watch(str(path), inotify_simple.flags.OPEN)
        action()
        return len(inotify.read(timeout=0))


def _stat(mtime_ns: int, ctime_ns: int) -> os.stat_result:
    # mode, ino, dev, nlink, uid, gid, size, atime, mtime, ctime (int seconds), then the
    # float times and the _ns times.
    fields = [0o100644, 1, 1, 1, 0, 0, 10, 0, 0, 0]
    return os.stat_result((*fields, 0.0, mtime_ns / 1e9, ctime_ns / 1e9, 0, mtime_ns, ctime_ns))


# -- the racy-clean rule, pure -------------------------------------------------------
def test_a_back_dated_mtime_with_a_fresh_ctime_is_not_cached() -> None:
    now = time.time_ns()
    assert not can_cache_hash(_stat(now - HOUR_NS, now), now)  # cp -p, rsync -t


def test_a_future_mtime_is_cached_once_ctime_is_old() -> None:
    now = time.time_ns()
    assert can_cache_hash(_stat(now + 24 * HOUR_NS, now - HOUR_NS), now)


def test_a_recent_change_and_a_ctime_ahead_of_the_clock_are_not_cached() -> None:
    now = time.time_ns()
    assert not can_cache_hash(_stat(now - HOUR_NS, now - HOUR_NS // 3600), now)  # 1 s ago
    assert not can_cache_hash(_stat(now - HOUR_NS, now + HOUR_NS), now)  # clock stepped back
    assert can_cache_hash(_stat(now - HOUR_NS, now - HOUR_NS), now)


# -- the stat cache, on real files ---------------------------------------------------
@linux_only
def test_a_fresh_file_with_a_back_dated_mtime_is_read_again(tmp_path: Path) -> None:
    """`cp -p`: mtime an hour old, content written just now. Trusting the cache could
    keep a racily clean hash (a same-size rewrite in the same tick has the same stat)."""
    config = tmp_path / "envoy.yaml"
    config.write_text("version: 1\n")
    hour_ago = time.time() - 3600
    os.utime(config, (hour_ago, hour_ago))
    scanner = _scanner(tmp_path)
    assert _opens_during(config, scanner.scan) == 1
    assert _opens_during(config, scanner.scan) == 1, "a racily clean hash was trusted"


@linux_only
def test_a_file_with_a_future_mtime_is_cached_once_settled(tmp_path: Path) -> None:
    """A binary built on a machine whose clock runs ahead: hashed once, not per scan."""
    binary = tmp_path / "envoy"
    binary.write_bytes(b"\x7fELF" * 1024)
    tomorrow = time.time() + 86400
    os.utime(binary, (tomorrow, tomorrow))
    ctime_ns = binary.stat().st_ctime_ns
    wait_until(
        lambda: time.time_ns() - ctime_ns > (RACY_WINDOW_S + 0.2) * 1e9,
        timeout_s=10,
        what="the file's last change to leave the racy window",
        interval_s=0.1,
    )
    scanner = _scanner(binary)
    assert _opens_during(binary, scanner.scan) == 1
    assert _opens_during(binary, scanner.scan) == 0, "re-read although nothing changed"
    binary.write_bytes(b"\x7fELF" * 1025)  # positive control: a change is read
    snapshot = scanner.scan()
    assert snapshot.files_read == 1


# -- bounds --------------------------------------------------------------------------
def test_a_huge_file_in_a_tree_is_compared_by_stat_not_read(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "envoy.yaml").write_text("version: 1\n")
    big = tmp_path / "disk.img"
    with open(big, "wb") as handle:
        handle.truncate(65 * 1024 * 1024)  # sparse: costs no disk
    os.symlink(big, conf / "data.img")
    scanner = _scanner(conf)
    snapshot = scanner.scan()
    assert snapshot.by_stat == (f"{conf}/data.img",)
    assert snapshot.files_read == 1, "only envoy.yaml was read"
    with open(big, "r+b") as handle:  # a write is still a change
        handle.write(b"x")
    os.utime(big, ns=(0, big.stat().st_mtime_ns + 1_000_000_000))
    assert scanner.scan().digest != snapshot.digest


def test_a_huge_file_named_as_a_root_is_still_hashed(tmp_path: Path) -> None:
    """The Envoy binary (~100 MiB): a reinstall of the same bytes must restart nothing."""
    binary = tmp_path / "envoy"
    with open(binary, "wb") as handle:
        handle.truncate(65 * 1024 * 1024)
    first = _scanner(binary).scan()
    assert first.by_stat == ()
    binary.unlink()
    with open(binary, "wb") as handle:
        handle.truncate(65 * 1024 * 1024)
    assert _scanner(binary).scan().digest == first.digest


def test_a_symlink_to_the_root_directory_is_not_walked(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "envoy.yaml").write_text("version: 1\n")
    os.symlink("/", conf / "everything")
    os.symlink("..", conf / "up")
    watched: list[Path] = []
    snapshot = _scanner(conf).scan(lambda path, _names: watched.append(path))
    assert list(snapshot.files) == [f"{conf}/envoy.yaml"]
    assert len(snapshot.not_walked) == 2, snapshot.not_walked
    assert Path("/") not in snapshot.directories and tmp_path not in snapshot.directories
    assert len(watched) < 10, watched


def test_a_huge_tree_behind_a_symlink_is_cut_at_the_cap(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    for sub in range(3):
        part = outside / f"d{sub}"
        part.mkdir(parents=True)
        for i in range(MAX_LINKED_ENTRIES // 2):
            (part / f"f{i:05}").touch()
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "envoy.yaml").write_text("version: 1\n")
    os.symlink(outside, conf / "shared")
    snapshot = _scanner(conf).scan()
    assert f"{conf}/envoy.yaml" in snapshot.files
    assert MAX_LINKED_ENTRIES // 2 < len(snapshot.files) <= MAX_LINKED_ENTRIES + 1
    assert len(snapshot.not_walked) == 1 and f"{conf}/shared" in snapshot.not_walked[0]
    assert _scanner(conf).scan().digest == snapshot.digest, "the cut is deterministic"


def test_a_plain_tree_is_never_cut(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    for sub in range(3):
        part = conf / f"d{sub}"
        part.mkdir(parents=True)
        for i in range(MAX_LINKED_ENTRIES // 2):
            (part / f"f{i:05}").touch()
    snapshot = _scanner(conf).scan()
    assert len(snapshot.files) == 3 * (MAX_LINKED_ENTRIES // 2)
    assert snapshot.not_walked == ()


def test_a_tree_deeper_than_the_recursion_limit_is_walked(tmp_path: Path) -> None:
    depth = sys.getrecursionlimit() + 200
    with deep_tree(tmp_path / "conf", depth) as leaf:
        watched: list[Path] = []
        snapshot = _scanner(tmp_path / "conf").scan(lambda path, _names: watched.append(path))
        assert str(leaf) in snapshot.files
        assert len(snapshot.directories) == depth + 1
        assert watched[-1] == leaf.parent, "each directory is watched before it is listed"


def test_excluded_paths_are_left_out_of_the_digest(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    (conf / "logs").mkdir(parents=True)
    (conf / "envoy.yaml").write_text("version: 1\n")
    log = conf / "logs" / "access.log"
    log.write_text("GET /\n")
    scanner = _scanner(conf)
    scanner.excluded = frozenset({str(log)})
    first: Snapshot = scanner.scan()
    assert list(first.files) == [f"{conf}/envoy.yaml"]
    log.write_text("GET /\nGET /again\n")
    assert scanner.scan().digest == first.digest


@pytest.mark.parametrize("size", [0, 1, 65_535, 65_536, 65_537, 200_000])
def test_a_file_hashes_to_the_sha256_of_its_bytes_at_any_size(tmp_path: Path, size: int) -> None:
    """Read through a 64 KiB buffer (digest.sha256_of): every chunk counts, once."""
    data = bytes(range(256)) * (size // 256 + 1)
    path = tmp_path / "f"
    path.write_bytes(data[:size])
    assert sha256_of(str(path)) == hashlib.sha256(data[:size]).digest()


def test_a_fifo_where_a_file_was_is_not_waited_on(tmp_path: Path) -> None:
    """A FIFO swapped in after the stat: opening it must not block the loop."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert sha256_of(str(fifo)) == hashlib.sha256(b"").digest()
