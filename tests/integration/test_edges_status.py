"""The status server against clients that do not play along, and addresses that once
became tracebacks: real sockets, real threads, the real command line."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from envoy_autoreload.status_address import MAX_CONNECTIONS
from envoy_autoreload.status_server import StatusServer
from envoy_autoreload.telemetry import Telemetry
from tests.daemon import one_error_line, run_cli, start_daemon
from tests.helpers import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server() -> Iterator[StatusServer]:
    telemetry = Telemetry()
    telemetry.publish({"state": "serving", "serving": {"epoch": 0, "pid": 1}}, None)
    status = StatusServer(("127.0.0.1", 0), telemetry)
    status.start()
    yield status
    status.close()
    wait_until(lambda: not _handler_threads() or None, timeout_s=15, what="handler threads to end")


def _handler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "process_request_thread" in t.name]


def _get(port: int, path: str, family: int = socket.AF_INET, host: str = "127.0.0.1") -> bytes:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect((host, port))
        sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_a_silent_client_is_dropped_after_the_handler_timeout(server: StatusServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        idle.settimeout(30)  # 5 s handler timeout, with room for a loaded box
        assert idle.recv(1) == b"", "the server closed the silent connection"
    assert _get(server.port, "/healthz").startswith(b"HTTP/1.0 200")


def test_connections_beyond_the_cap_are_closed_at_once(server: StatusServer) -> None:
    extra = 40
    with contextlib.ExitStack() as stack:
        clients = []
        for _ in range(MAX_CONNECTIONS + extra):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", server.port)))
            sock.setblocking(False)
            clients.append(sock)
        closed: set[int] = set()

        def over_the_cap_closed() -> bool | None:
            # Never more than MAX_CONNECTIONS threads; the rest are closed on accept.
            assert len(_handler_threads()) <= MAX_CONNECTIONS
            closed.update(
                i for i, c in enumerate(clients) if i not in closed and _closed_by_server(c)
            )
            return len(closed) >= extra or None

        wait_until(over_the_cap_closed, timeout_s=20, what=f"{extra} connections closed")
    # Once they go, the server answers again.
    wait_until(
        lambda: _get(server.port, "/healthz").startswith(b"HTTP/1.0 200"),
        timeout_s=15,
        what="/healthz after the flood",
    )


def _ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def _script(tmp_path: Path) -> Path:
    script = tmp_path / "start.sh"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("address", ["127.0.0.1:70000", "127.0.0.1:²", "127.0.0.1:٩٩٠٢"])
def test_a_bad_status_port_is_one_line_at_start_up(tmp_path: Path, address: str) -> None:
    result = run_cli(["--status-address", address, str(_script(tmp_path))])
    assert result.returncode == 2, result.stderr
    assert "--status-address" in one_error_line(result.stderr)


def test_an_ipv6_status_address_serves_or_is_refused_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    daemon = start_daemon(
        [
            "--status-address",
            f"[::1]:{port}",
            "--admin-address",
            "127.0.0.1:1",
            str(_script(tmp_path)),
        ],
        tmp_path / "d.log",
    )
    try:
        if not _ipv6_loopback_works():
            assert daemon.wait_exit(timeout_s=30) == 2
            assert "[::1]" in one_error_line("\n".join(daemon.lines()))
            return
        daemon.wait_event("daemon.started")
        body = wait_until(
            lambda: _try_get_v6(port),
            timeout_s=30,
            what="GET /status over IPv6",
        )
        assert body.startswith(b"HTTP/1.0 200") and b'"state"' in body
    finally:
        daemon.stop()
    assert "Traceback" not in "\n".join(daemon.lines())


def _try_get_v6(port: int) -> bytes | None:
    try:
        return _get(port, "/status", socket.AF_INET6, "::1")
    except OSError:
        return None


HEALTHZ_IN_IMAGE = "/usr/local/lib/envoy-autoreload/healthz"


def test_the_kubernetes_example_exposes_no_status_port(tmp_path: Path) -> None:
    """/status stays on loopback (it names PIDs and paths and quotes the last error); the
    pod IP gets /healthz and /metrics alone, through the config's own `status` listener."""
    deployment = yaml.safe_load((REPO / "examples/kubernetes/deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert "--status-allow-remote" not in args
    assert "--status-address=127.0.0.1:9902" in args
    assert [p["containerPort"] for p in container["ports"]] == [8080, 9903]
    assert _exposed_status_paths() == {9903: ["/healthz", "/metrics"]}
    socket_env = {e["name"]: e["value"] for e in container["env"]}
    assert socket_env["ENVOY_AUTORELOAD_CONTROL_SOCKET"].startswith("/run/envoy-autoreload/")
    assert socket_env["ENVOY_AUTORELOAD_CONTROL_SOCKET"].count("/") > 3, "a private subdirectory"
    for probe in ("readinessProbe", "livenessProbe"):
        assert "httpGet" not in container[probe]
        assert container[probe]["exec"]["command"] == [HEALTHZ_IN_IMAGE]
    _the_probe_tells_serving_from_not(REPO / "examples/kubernetes/healthz.py")


def _exposed_status_paths() -> dict[int, list[str]]:
    """{port: paths} of every route in the example's Envoy config that reaches the
    status server (127.0.0.1:9902): each must be an exact path, never a prefix."""
    configmap = yaml.safe_load((REPO / "examples/kubernetes/configmap.yaml").read_text())
    bootstrap = yaml.safe_load(configmap["data"]["envoy.yaml"])
    to_status = {
        cluster["name"]
        for cluster in bootstrap["static_resources"]["clusters"]
        for endpoints in cluster["load_assignment"]["endpoints"]
        for endpoint in endpoints["lb_endpoints"]
        if endpoint["endpoint"]["address"]["socket_address"]["port_value"] == 9902
    }
    exposed: dict[int, list[str]] = {}
    for listener in bootstrap["static_resources"]["listeners"]:
        port = listener["address"]["socket_address"]["port_value"]
        for chain in listener["filter_chains"]:
            for hcm in chain["filters"]:
                hosts = hcm["typed_config"]["route_config"]["virtual_hosts"]
                for route in (r for host in hosts for r in host["routes"]):
                    if route.get("route", {}).get("cluster") in to_status:
                        assert set(route["match"]) == {"path"}, route
                        exposed.setdefault(port, []).append(route["match"]["path"])
    return exposed


def _the_probe_tells_serving_from_not(script: Path) -> None:
    """Run the example's exec probe against a real status server on a free port."""
    import subprocess

    telemetry = Telemetry()
    server = StatusServer(("127.0.0.1", 0), telemetry)
    server.start()
    try:
        probe = [sys.executable, str(script), f"http://127.0.0.1:{server.port}/healthz"]

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(probe, capture_output=True, text=True, timeout=30, check=False)

        telemetry.publish({"serving": None}, None)
        failing = run()
        assert failing.returncode == 1 and "503" in failing.stderr
        assert "Traceback" not in failing.stderr
        telemetry.publish({"serving": {"epoch": 0, "pid": 1}}, None)
        assert run().returncode == 0
    finally:
        server.close()
