"""Limit arithmetic and /proc parsing, on a /proc-shaped tree the test builds."""

from __future__ import annotations

import os
from pathlib import Path

from envoy_autoreload.limits import (
    LimitCheck,
    Usage,
    binding_limit,
    inotify_usage,
    suggested_limit,
)


def _proc(tmp_path: Path, global_watches: int, namespace_watches: int | None) -> Path:
    proc = tmp_path / "proc"
    (proc / "sys/fs/inotify").mkdir(parents=True)
    (proc / "sys/fs/inotify/max_user_watches").write_text(f"{global_watches}\n")
    (proc / "sys/fs/inotify/max_user_instances").write_text("128\n")
    if namespace_watches is not None:
        (proc / "sys/user").mkdir(parents=True)
        (proc / "sys/user/max_inotify_watches").write_text(f"{namespace_watches}\n")
    return proc


def test_the_smaller_limit_binds_and_names_its_sysctl(tmp_path: Path) -> None:
    limit = binding_limit("watches", _proc(tmp_path / "a", 8192, 1024))
    assert (limit.value, limit.sysctl, limit.set_outside_container) == (
        1024,
        "user.max_inotify_watches",
        True,
    )
    fix = limit.fix(3000)
    assert "sysctl -w user.max_inotify_watches=8192" in fix
    assert "/etc/sysctl.d/60-envoy-autoreload.conf" in fix and "outside the container" in fix
    limit = binding_limit("watches", _proc(tmp_path / "b", 8192, 1_000_000))
    assert (limit.value, limit.sysctl) == (8192, "fs.inotify.max_user_watches")
    assert "outside the container" not in limit.fix(10)


def test_suggested_limit_is_a_power_of_two_above_need_and_current() -> None:
    assert suggested_limit(100, 8192) == 16384
    assert suggested_limit(20_000, 8192) == 65536
    assert suggested_limit(1, None) == 8192


def test_headroom_of_ten_percent() -> None:
    limit = binding_limit("watches", Path("/nonexistent"))
    assert LimitCheck(limit, 10, 10).ok, "an unknown limit never fails"
    from envoy_autoreload.limits import Limit

    tight = Limit("watches", 1000, "fs.inotify.max_user_watches", False)
    assert LimitCheck(tight, 800, 100).ok
    assert not LimitCheck(tight, 850, 100).ok


def test_usage_counts_watches_of_the_users_inotify_fds(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid, watches in ((101, 3), (102, 2)):
        (proc / str(pid) / "fd").mkdir(parents=True)
        (proc / str(pid) / "fdinfo").mkdir()
        os.symlink("anon_inode:inotify", proc / str(pid) / "fd" / "7")
        os.symlink("/dev/null", proc / str(pid) / "fd" / "0")
        lines = [f"inotify wd:{i} ino:1 sdev:0 mask:fcc" for i in range(watches)]
        (proc / str(pid) / "fdinfo" / "7").write_text("pos:\t0\n" + "\n".join(lines) + "\n")
    assert inotify_usage(uid=os.getuid(), proc=proc) == Usage(instances=2, watches=5)
    assert inotify_usage(uid=os.getuid() + 1, proc=proc) == Usage(0, 0)
