"""contrib/systemd under a real systemd, its sandbox applied (README "Run it under
systemd").

The project's image stands in for a host where envoy-autoreload is installed (the
binaries in /usr/local/bin, the `envoy` user); systemd runs as its PID 1
(`--systemd=always`), and `--cap-add SYS_ADMIN` lets systemd build each unit's mount
namespace: without it, systemd skips ProtectSystem=, PrivateTmp= and the rest silently,
and a unit that fails under its own sandbox (226/NAMESPACE) would pass here. The unit and
the start script are installed from the repository with the README's commands.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.envoy.breakages import break_yaml
from tests.helpers import holds_for, wait_until
from tests.runtime.podman import REPO
from tests.runtime.runtime import Runtime

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(600)]

UNIT = "envoy-autoreload"
LISTENER = "http://127.0.0.1:10000/"
CONFIG = (REPO / "examples/dev/envoy.yaml").read_text()
# README "Run it under systemd", from the repository root (mounted at /src).
INSTALL = """\
install -m 0644 contrib/systemd/envoy-autoreload.service /etc/systemd/system/
install -D -m 0755 contrib/systemd/start_envoy.sh /usr/local/lib/envoy-autoreload/start_envoy.sh
systemctl daemon-reload && systemctl enable --now envoy-autoreload
"""


class Systemd:
    def __init__(self, runtime: Runtime, container: str) -> None:
        self.runtime, self.container = runtime, container

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.runtime.podman.exec(self.container, "sh", "-c", script, check=check)

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.runtime.podman.exec(
            self.container, "systemctl", "--no-pager", *args, timeout_s=120, check=check
        )

    def show(self, prop: str) -> str:
        return self.systemctl("show", "--property", prop, "--value", UNIT).stdout.strip()

    def write_config(self, text: str) -> None:
        """An atomic save of /etc/envoy/envoy.yaml, as an editor or a deploy tool does."""
        save = "cat > /etc/envoy/.new.yaml && mv /etc/envoy/.new.yaml /etc/envoy/envoy.yaml"
        self.runtime.podman.run("exec", "-i", self.container, "sh", "-c", save, stdin=text)

    def body(self) -> str:
        return self.runtime.get(self.container, LISTENER)

    def envoy_pids(self) -> set[int]:
        """Every Envoy process in the container (their /proc/PID/comm is "envoy")."""
        out = self.sh("grep -lx envoy /proc/[0-9]*/comm || true").stdout
        return {int(line.split("/")[2]) for line in out.split()}

    def journal(self) -> str:
        return self.runtime.podman.exec(
            self.container, "journalctl", "--no-pager", "-u", UNIT, check=False
        ).stdout

    def started_fresh(self, config: str) -> None:
        """The unit stopped, its failures forgotten, `config` installed, started."""
        self.systemctl("stop", UNIT, check=False)
        self.systemctl("reset-failed", UNIT, check=False)
        self.write_config(config)
        started = self.systemctl("start", UNIT, check=False)
        assert started.returncode == 0, f"{started.stderr}\n{self.journal()[-4000:]}"


def test_the_readme_installs_the_unit_with_these_commands() -> None:
    assert INSTALL in (REPO / "README.md").read_text()


@pytest.fixture(scope="module")
def systemd(runtime: Runtime) -> Iterator[Systemd]:
    with runtime.running(
        "systemd", "--systemd=always", "--cap-add", "SYS_ADMIN", "--user", "root",
        "-v", f"{REPO / 'contrib'}:/src/contrib:ro", "--workdir", "/src",
        "--entrypoint", "/sbin/init", runtime.image,
    ) as name:  # fmt: skip
        unit = Systemd(runtime, name)
        wait_until(
            lambda: (
                unit.systemctl("is-system-running", check=False).stdout.strip()
                in ("running", "degraded")
            ),
            timeout_s=60,
            what="systemd in the container to finish booting",
        )
        unit.write_config(CONFIG)
        unit.sh(INSTALL)
        assert unit.show("ActiveState") == "active", unit.journal()
        yield unit


def test_start_returns_once_envoy_serves_and_status_names_it(systemd: Systemd) -> None:
    systemd.started_fresh(CONFIG)
    # No wait: `systemctl start` of a Type=notify unit returns at READY=1, once LIVE.
    assert systemd.body() == "200 hello from envoy-autoreload v1\n"
    main_pid = int(systemd.show("MainPID"))
    mounts = systemd.sh(f"cat /proc/{main_pid}/mountinfo").stdout
    assert re.search(r"^\S+ \S+ \S+ / / ro,", mounts, re.MULTILINE), "ProtectSystem=strict"
    assert "systemd-private-" in mounts, "PrivateTmp= applied"
    status = systemd.systemctl("status", UNIT).stdout
    assert re.search(r'Status: "epoch 0 serving \(pid \d+, config [0-9a-f]{12}\)"', status), status


def test_reload_answers_for_unchanged_good_and_bad_configs(systemd: Systemd) -> None:
    systemd.started_fresh(CONFIG)
    assert systemd.systemctl("reload", UNIT, check=False).returncode == 0, "unchanged"
    good = CONFIG.replace("v1", "v2")
    systemd.write_config(good)
    reloaded = systemd.systemctl("reload", UNIT, check=False)
    assert reloaded.returncode == 0, reloaded.stderr
    assert systemd.body() == "200 hello from envoy-autoreload v2\n"
    systemd.write_config(break_yaml(good))
    refused = systemd.systemctl("reload", UNIT, check=False)
    assert refused.returncode != 0, "a config that does not validate fails the reload"
    assert systemd.body() == "200 hello from envoy-autoreload v2\n", "the old config serves"
    assert systemd.show("ActiveState") == "active"
    assert "validation.failed" in systemd.journal()


def test_stop_stops_every_envoy_within_the_unit_timeout(systemd: Systemd) -> None:
    systemd.started_fresh(CONFIG)
    systemd.write_config(CONFIG.replace("v1", "v2"))
    assert systemd.systemctl("reload", UNIT, check=False).returncode == 0
    assert len(systemd.envoy_pids()) == 2, "epoch 1 serves while epoch 0 drains"
    timeout_s = int(systemd.show("TimeoutStopUSec").removesuffix("s"))
    began = time.monotonic()
    systemd.systemctl("stop", UNIT)
    assert time.monotonic() - began < timeout_s
    assert systemd.envoy_pids() == set()
    assert systemd.show("Result") == "success", "the daemon stopped them, not systemd's KILL"
    assert "shutdown.finished exit_code=0" in systemd.journal()


def test_kill_of_the_daemon_leaves_no_envoy(systemd: Systemd) -> None:
    systemd.started_fresh(CONFIG)
    (envoy,) = systemd.envoy_pids()
    daemon = int(systemd.show("MainPID"))
    systemd.systemctl("kill", "--kill-who=main", "--signal=KILL", UNIT)
    wait_until(
        lambda: envoy not in systemd.envoy_pids(),
        timeout_s=30,
        what=f"the killed daemon's Envoy {envoy} to be gone",
        interval_s=0.2,
    )
    # Restart=on-failure: a new daemon whose epoch 0 could not start beside a leftover.
    wait_until(
        lambda: systemd.show("ActiveState") == "active" and int(systemd.show("MainPID")) != daemon,
        timeout_s=60,
        what="systemd to restart the unit",
        interval_s=0.2,
    )
    assert systemd.body() == "200 hello from envoy-autoreload v1\n"
    assert len(systemd.envoy_pids()) == 1


def test_a_crash_loop_ends_in_the_failed_state(systemd: Systemd) -> None:
    systemd.started_fresh(CONFIG)
    systemd.systemctl("stop", UNIT)
    systemd.write_config(break_yaml(CONFIG))  # the daemon exits 3 at every start
    systemd.systemctl("start", UNIT, check=False)
    wait_until(
        lambda: systemd.show("ActiveState") == "failed",
        timeout_s=120,
        what="the unit's start limit to end the loop",
        interval_s=0.5,
    )
    restarts = systemd.show("NRestarts")
    assert int(restarts) >= 2, "it did restart before giving up"
    # RestartSec=2: a loop that goes on restarts within this window.
    holds_for(
        lambda: systemd.show("ActiveState") == "failed" and systemd.show("NRestarts") == restarts,
        duration_s=5,
        what="the unit to stay failed",
        interval_s=0.5,
    )
    assert "Start request repeated too quickly" in systemd.journal()
