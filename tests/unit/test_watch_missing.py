"""`MissingPaths.hold` never raises for a config it cannot stat (review #13).

`Path.exists()` raised on Python 3.11 for anything but ENOENT/ENOTDIR/EBADF/ELOOP, and
`hold` runs inside the loop, where an exception stops every Envoy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import envoy_autoreload
from envoy_autoreload.digest import Snapshot, WatchRoot
from envoy_autoreload.watch.missing import MissingPaths


def _snapshot() -> Snapshot:
    return Snapshot(files={}, digest=hashlib.sha256().hexdigest(), directories=frozenset())


def test_a_config_name_longer_than_name_max_is_held_not_raised(tmp_path: Path) -> None:
    missing = MissingPaths([WatchRoot(tmp_path)])
    config = tmp_path / ("c" * 300)  # ENAMETOOLONG from stat(2)
    assert missing.hold(_snapshot(), _snapshot(), config=config, epoch=0, pid=1)
    assert missing.reported == (str(config),)


def test_a_present_config_does_not_hold(tmp_path: Path) -> None:
    (tmp_path / "envoy.yaml").write_text("x: 1\n")
    missing = MissingPaths([WatchRoot(tmp_path)])
    assert not missing.hold(_snapshot(), _snapshot(), config=tmp_path / "envoy.yaml")


_HOLD_SCRIPT = """
import hashlib, sys
from pathlib import Path
from envoy_autoreload.digest import Snapshot, WatchRoot
from envoy_autoreload.watch.missing import MissingPaths
top = Path(sys.argv[1])
snap = Snapshot(files={}, digest=hashlib.sha256().hexdigest(), directories=frozenset())
held = MissingPaths([WatchRoot(top)]).hold(snap, snap, config=top / "locked" / "envoy.yaml")
print("held" if held else "not held")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="setpriv is Linux's")
def test_a_config_in_an_unsearchable_directory_is_held_not_raised() -> None:
    """The review's case: the directory became mode 000. Run as an unprivileged user
    (root ignores the mode), through setpriv when the tests run as root; in a fresh
    directory under /tmp, since pytest's own are private to the user running it."""
    shared = Path(tempfile.mkdtemp(prefix="watch-missing-", dir="/tmp"))
    locked = shared / "locked"
    try:
        shared.chmod(0o755)
        locked.mkdir(mode=0o755)
        (locked / "envoy.yaml").write_text("x: 1\n")
        locked.chmod(0o000)
        prefix: list[str] = []
        if os.geteuid() == 0:
            prefix = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
        result = subprocess.run(
            [*prefix, sys.executable, "-c", _HOLD_SCRIPT, str(shared)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(envoy_autoreload.__file__).parents[1])},
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "held"
    finally:
        locked.chmod(0o755)
        shutil.rmtree(shared)
