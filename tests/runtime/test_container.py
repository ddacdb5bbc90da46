"""The image (Containerfile) and the dev loop in a container, under podman (README "Run it
in a container")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import allocate_base_id, free_port, http_get, wait_until
from tests.runtime.podman import REPO
from tests.runtime.runtime import Runtime

pytestmark = [pytest.mark.runtime, pytest.mark.timeout(600)]

ELF_MAGIC = "177 E L F"


def test_the_image_runs_the_real_envoy_as_a_user_under_tini(runtime: Runtime) -> None:
    probe = runtime.podman.run(
        "run",
        "--rm",
        "--entrypoint",
        "/bin/sh",
        runtime.image,
        "-c",
        'id -u; command -v envoy; od -An -c -N4 "$(readlink -f "$(command -v envoy)")"; '
        "envoy --version; ls -l /usr/local/lib/envoy-autoreload/start_envoy.sh",
    ).stdout.splitlines()
    uid, envoy_path, magic, version, script = (line.strip() for line in probe if line.strip())
    assert uid == "10101"
    assert envoy_path == "/usr/local/bin/envoy"
    assert " ".join(magic.split()) == ELF_MAGIC, "the binary, not the Python wrapper"
    assert "/1.40." in version
    assert script.startswith("-rwxr-xr-x"), script
    config = json.loads(runtime.inspect(runtime.image, "{{json .Config}}"))
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "/usr/local/bin/envoy-autoreload"]
    assert config["User"] == "10101:10101"


ORPHAN_SCRIPT = """\
#!/bin/sh
# A grandchild whose parent (the subshell) exits at once: it is reparented to PID 1.
( sh -c 'echo $$ > /tmp/orphan.pid; exec sleep 2' & )
exec /usr/local/lib/envoy-autoreload/start_envoy.sh
"""


def test_pid_1_reaps_an_orphan_of_a_start_script(runtime: Runtime, tmp_path: Path) -> None:
    config = tmp_path / "envoy"
    config.mkdir()
    shutil.copy(REPO / "examples/dev/envoy.yaml", config / "envoy.yaml")
    (config / "start.sh").write_text(ORPHAN_SCRIPT)
    (config / "start.sh").chmod(0o755)
    with runtime.running(
        "orphan", "-v", f"{config}:/etc/envoy:ro", runtime.image,
        "--watch=/etc/envoy", "--config=/etc/envoy/envoy.yaml", "/etc/envoy/start.sh",
    ) as name:  # fmt: skip
        pid = wait_until(
            lambda: runtime.podman.exec(name, "cat", "/tmp/orphan.pid", check=False).stdout.strip(),
            timeout_s=60,
            what="the orphan to write its PID",
        )
        stat = runtime.podman.exec(name, "cat", f"/proc/{pid}/stat").stdout
        assert stat.rsplit(")", 1)[1].split()[1] == "1", f"reparented to PID 1: {stat}"
        assert "tini" in runtime.podman.exec(name, "cat", "/proc/1/cmdline").stdout
        wait_until(
            lambda: runtime.podman.exec(name, "test", "-e", f"/proc/{pid}", check=False).returncode,
            timeout_s=30,
            what=f"the orphan {pid} to exit and be reaped (not a zombie)",
        )
        assert "200 hello from envoy-autoreload v1" in runtime.get(name, "http://127.0.0.1:10000/")


DEV_LOOP = """\
podman run --rm --network host -v "$PWD/examples/dev:/etc/envoy:ro" envoy-autoreload \\
    --watch /etc/envoy --config /etc/envoy/envoy.yaml /etc/envoy/start_envoy.sh
"""


def test_the_readme_runs_the_dev_loop_with_this_command() -> None:
    assert DEV_LOOP in (REPO / "README.md").read_text()


def test_the_dev_loop_serves_a_host_edit_at_epoch_1(runtime: Runtime, tmp_path: Path) -> None:
    """README's `podman run --network host -v "$PWD/examples/dev:/etc/envoy:ro" ...` with
    the example's ports and base id changed to ones no other test has (host network)."""
    dev = tmp_path / "dev"
    shutil.copytree(REPO / "examples/dev", dev)
    admin, listener = free_port(), free_port()
    config = dev / "envoy.yaml"
    config.write_text(
        config.read_text().replace("9901", str(admin)).replace("10000", str(listener))
    )
    dev.chmod(0o755)
    with runtime.running(
        "dev", "--network", "host", "-e", f"ENVOY_BASE_ID={allocate_base_id()}",
        "-v", f"{dev}:/etc/envoy:ro", runtime.image,
        "--watch", "/etc/envoy", "--config", "/etc/envoy/envoy.yaml", "/etc/envoy/start_envoy.sh",
    ) as name:  # fmt: skip
        wait_until(
            lambda: http_get(listener) == (200, "hello from envoy-autoreload v1\n"),
            timeout_s=60,
            what=f"the container's Envoy to serve v1 ({name})",
        )
        config.write_text(config.read_text().replace("v1", "v2"))  # an edit on the host
        wait_until(
            lambda: http_get(listener) == (200, "hello from envoy-autoreload v2\n"),
            timeout_s=60,
            what="the host's edit to be served",
        )
        served = http_get(admin, "/server_info")
        assert served is not None
        assert json.loads(served[1])["command_line_options"]["restart_epoch"] == 1
        runtime.podman.run("stop", "--time", "30", name)
        assert runtime.exit_code(name) == 0, runtime.logs(name)
        assert "shutdown.finished exit_code=0" in runtime.logs(name)
