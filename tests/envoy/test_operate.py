"""Operating it: systemd notify, status and metrics over HTTP, the synchronous reload
client, the examples and the unit file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.envoy.conftest import ENVOY_BIN, EnvoyFamily
from tests.helpers import free_port, http_get, wait_until

REPO = Path(__file__).resolve().parents[2]
CTL = Path(sys.executable).parent / "envoy-autoreloadctl"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(30)
    yield sock
    sock.close()


def _datagrams_until(sock: socket.socket, key: str) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    while True:
        raw = sock.recv(4096).decode()
        message = dict(line.split("=", 1) for line in raw.splitlines())
        messages.append(message)
        if key in message:
            return messages


def test_systemd_hears_ready_reloading_ready_and_stopping_in_order(
    envoy_family: EnvoyFamily, notify_socket: socket.socket
) -> None:
    daemon = envoy_family.start(
        "--config",
        str(envoy_family.config),
        env={"NOTIFY_SOCKET": notify_socket.getsockname()},
    )
    first = _datagrams_until(notify_socket, "READY")
    assert "epoch 0 serving" in first[-1]["STATUS"]
    envoy_family.write_config("v1")
    daemon.signal(signal.SIGHUP)
    reloading = _datagrams_until(notify_socket, "RELOADING")[-1]
    assert int(reloading["MONOTONIC_USEC"]) > 0
    ready = _datagrams_until(notify_socket, "READY")[-1]
    assert "epoch 1 serving" in ready["STATUS"]
    daemon.signal(signal.SIGTERM)
    stopping = _datagrams_until(notify_socket, "STOPPING")[-1]
    assert stopping["STOPPING"] == "1" and "stopping" in stopping["STATUS"]
    assert daemon.wait_exit() == 0


def _status(port: int) -> dict[str, object]:
    result = http_get(port, "/status")
    assert result is not None and result[0] == 200
    body: dict[str, object] = json.loads(result[1])
    return body


def _metric(port: int, name: str) -> float:
    result = http_get(port, "/metrics")
    assert result is not None and result[0] == 200
    for line in result[1].splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_status_metrics_and_healthz_through_a_refused_and_a_good_restart(
    envoy_family: EnvoyFamily,
) -> None:
    marker = envoy_family.root / "hang"
    wrapper = envoy_family.root / "envoy-wrapper"
    wrapper.write_text(
        f'#!/bin/sh\n[ "$1" = "--mode" ] && [ -e {marker} ] && sleep 3 && exit 1\n'
        f'exec {ENVOY_BIN} "$@"\n'
    )
    wrapper.chmod(0o755)
    port = free_port()
    daemon = envoy_family.start(
        "--envoy",
        str(wrapper),
        "--config",
        str(envoy_family.config),
        "--status-address",
        f"127.0.0.1:{port}",
    )
    daemon.wait_event("child.serving", epoch=0)
    # Published once the event that made it LIVE is handled (a moment after the line).
    wait_until(
        lambda: http_get(port, "/healthz") == (200, "serving\n"), timeout_s=10, what="/healthz"
    )
    status = _status(port)
    serving = status["serving"]
    assert isinstance(serving, dict)
    assert {k: serving[k] for k in ("epoch", "pid")} == {
        "epoch": 0,
        "pid": daemon.events("child.serving")[0]["pid"],
    }
    sha = serving["config_sha256"]  # the snapshot it runs, also in the metrics
    assert _metric(port, f'envoy_autoreload_config_info{{sha256="{sha}"}}') == 1
    assert status["envoy"] == {"version": "1.40.0", "hot_restart_version": "11.104"}
    # During a restart (a validation that takes 3 s, then fails) Envoy keeps serving.
    marker.touch()
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: _status(port)["state"] == "validating", timeout_s=10, what="validating")
    assert http_get(port, "/healthz") == (200, "serving\n")
    daemon.wait_event("validation.failed")
    wait_until(
        lambda: _status(port)["last_validation_error"], timeout_s=10, what="the error in /status"
    )
    last = _status(port)["last_restart"]
    assert isinstance(last, dict) and last["outcome"] == "validation_failed"
    assert _metric(port, "envoy_autoreload_validation_failures_total") == 1
    marker.unlink()
    envoy_family.write_config("v1")
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("child.serving", epoch=1)
    wait_until(lambda: _metric(port, "envoy_autoreload_epoch") == 1, timeout_s=10, what="epoch 1")
    assert _metric(port, 'envoy_autoreload_restarts_total{outcome="success"}') == 1
    assert _metric(port, "envoy_autoreload_restart_duration_seconds_count") == 1
    assert _metric(port, "envoy_autoreload_last_success_timestamp_seconds") > 0
    status = _status(port)
    assert isinstance(status["last_restart"], dict)
    assert status["last_restart"]["outcome"] == "success"
    draining = status["draining"]
    assert isinstance(draining, list)
    assert [(g["epoch"], g["pid"]) for g in draining] == [
        (0, daemon.events("child.serving")[0]["pid"])
    ]
    # Nothing over TCP changes anything.
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(b"POST /status HTTP/1.0\r\n\r\n")
    assert b" 405 " in conn.recv(100)
    conn.close()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0


def _ctl(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CTL), "--control-socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_reload_client_tells_the_truth(envoy_family: EnvoyFamily) -> None:
    daemon = envoy_family.start(
        "--watch", str(envoy_family.root), "--config", str(envoy_family.config)
    )
    daemon.wait_event("child.serving", epoch=0)
    sock = daemon.log_path.with_suffix(".sock")
    assert sock.stat().st_mode & 0o777 == 0o600

    unchanged = _ctl(sock, "reload")
    assert unchanged.returncode == 0 and "unchanged" in unchanged.stdout
    assert not daemon.events("child.started", epoch=1)

    envoy_family.write_config("v1")
    good = _ctl(sock, "reload")
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("epoch 1:") and len(good.stdout.splitlines()) == 1
    assert envoy_family.body() == "v1"

    envoy_family.write_raw("admin: [unclosed\n")
    broken = _ctl(sock, "reload")
    assert broken.returncode == 1
    assert "validation failed" in broken.stderr and "yaml-cpp" in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1 and broken.stdout == ""
    assert envoy_family.body() == "v1"

    status = _ctl(sock, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["serving"]["epoch"] == 1


def test_a_non_loopback_status_address_is_refused(envoy_family: EnvoyFamily) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "envoy_autoreload",
            "--status-address",
            "0.0.0.0:9902",
            str(envoy_family.script),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "not a loopback address" in result.stderr and "Traceback" not in result.stderr


def _validate(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENVOY_BIN), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_examples_configs_validate(tmp_path: Path) -> None:
    for config in (REPO / "examples/dev/envoy.yaml", REPO / "examples/config-push/envoy.yaml"):
        result = _validate(config)
        assert result.returncode == 0, result.stderr
    documents = list(yaml.safe_load_all((REPO / "examples/kubernetes/configmap.yaml").read_text()))
    embedded = tmp_path / "envoy.yaml"
    embedded.write_text(documents[0]["data"]["envoy.yaml"])
    result = _validate(embedded)
    assert result.returncode == 0, result.stderr
    deployment = yaml.safe_load((REPO / "examples/kubernetes/deployment.yaml").read_text())
    assert deployment["kind"] == "Deployment"


def test_the_dev_example_serves_and_reloads_on_an_edit(
    envoy_family: EnvoyFamily, tmp_path: Path
) -> None:
    dev = tmp_path / "dev"
    shutil.copytree(REPO / "examples/dev", dev)
    config = dev / "envoy.yaml"
    config.write_text(
        config.read_text()
        .replace("9901", str(envoy_family.admin_port))
        .replace("10000", str(envoy_family.listener_port))
    )
    env = {
        "ENVOY_BASE_ID": str(envoy_family.base_id),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    daemon = envoy_family.start_script(
        dev / "start_envoy.sh", "--watch", str(dev), "--config", str(config), env=env
    )
    daemon.wait_event("child.serving", epoch=0)
    assert envoy_family.body() == "hello from envoy-autoreload v1\n"
    config.write_text(config.read_text().replace("v1", "v2"))  # an editor's plain save
    daemon.wait_event("child.serving", epoch=1)
    wait_until(
        lambda: envoy_family.body() == "hello from envoy-autoreload v2\n",
        timeout_s=10,
        what="the edit served",
    )


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (REPO / "contrib/systemd/envoy-autoreload.service").read_text()
    bindir = Path(sys.executable).parent
    # verify checks that the commands exist: point them at this install.
    unit = unit.replace("/usr/local/bin/envoy-autoreloadctl", str(bindir / "envoy-autoreloadctl"))
    unit = unit.replace("/usr/local/bin/envoy-autoreload ", f"{bindir / 'envoy-autoreload'} ")
    copy = tmp_path / "envoy-autoreload.service"
    copy.write_text(unit)
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "KillMode=mixed" in unit and "Type=notify" in unit
    assert "ExecReload=" in unit and "envoy-autoreloadctl reload" in unit


def test_a_silent_control_client_is_dropped_and_others_still_served(
    envoy_family: EnvoyFamily,
) -> None:
    daemon = envoy_family.start("--config", str(envoy_family.config))
    daemon.wait_event("child.serving", epoch=0)
    sock_path = daemon.log_path.with_suffix(".sock")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(sock_path))
    silent.settimeout(30)
    assert silent.recv(100) == b"", "closed by the daemon after its idle timeout"
    silent.close()
    status = _ctl(sock_path, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["serving"]["epoch"] == 0
