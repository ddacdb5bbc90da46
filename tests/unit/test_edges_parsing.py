"""Edge inputs that once escaped as tracebacks or misled the supervisor: configs Envoy
accepts but Python cannot decode, unicode digits, out-of-range ports, helpers taken for
Envoy, errors leaking the config into /status, Envoy's lines and --log-level."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from envoy_autoreload.addresses import AdminAddress, parse_admin_address, parse_status_address
from envoy_autoreload.envoy_config import admin_address_from_config
from envoy_autoreload.envoy_process import looks_like_envoy
from envoy_autoreload.errors import ConfigError, UsageError
from envoy_autoreload.logs import configure_logging, log_event
from envoy_autoreload.telemetry import Telemetry

ADMIN = b"admin:\n  address:\n    socket_address: { address: 127.0.0.1, port_value: 9901 }\n"


# -- finding 1: a config Envoy serves but that is not UTF-8 -------------------------
@pytest.mark.parametrize(
    "data",
    [
        ADMIN + b"# caf\xe9\n",  # a Latin-1 comment: yaml-cpp passes it through
        b"# caf\xe9\n" + ADMIN,
        ADMIN + b"# \x93quoted\x94 from Windows\n",
        ADMIN.replace(b"127.0.0.1", b"127.0.0.1 \xff"),
    ],
)
def test_a_config_that_is_not_utf8_is_one_config_error_line(tmp_path: Path, data: bytes) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        admin_address_from_config(config)
    assert "\n" not in str(info.value) and str(config) in str(info.value)


def test_a_utf16_config_with_a_bom_is_read(tmp_path: Path) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_bytes(ADMIN.decode().encode("utf-16"))  # Envoy decodes it too
    assert admin_address_from_config(config) == AdminAddress("127.0.0.1", 9901)


def test_an_unusable_port_value_is_no_address(tmp_path: Path) -> None:
    config = tmp_path / "envoy.yaml"
    for port in ("'²'", "99999999", "-1", "true", "'٣٠'"):
        config.write_text(f"admin:\n  address:\n    socket_address: {{ port_value: {port} }}\n")
        assert admin_address_from_config(config) is None, port


# -- finding 13: unicode digits and ports beyond 65535 -------------------------------
@pytest.mark.parametrize("text", ["127.0.0.1:²", "127.0.0.1:٩٩٠١", "127.0.0.1:70000", "h:0"])
def test_admin_address_with_a_bad_port_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="not HOST:PORT"):
        parse_admin_address(text)


@pytest.mark.parametrize("text", ["127.0.0.1:²", "127.0.0.1:٩٩٠٢", "127.0.0.1:70000", ":9902"])
def test_status_address_with_a_bad_port_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="not HOST:PORT"):
        parse_status_address(text, allow_remote=False)


def test_status_address_accepts_ipv6_loopback() -> None:
    assert parse_status_address("[::1]:9902", allow_remote=False) == ("::1", 9902)


# -- finding 4: a helper with `-c` is not Envoy --------------------------------------
@pytest.mark.parametrize(
    ("exe", "argv"),
    [
        ("/usr/bin/curl", ["curl", "-sf", "-c", "jar", "http://127.0.0.1:9/"]),
        ("/usr/bin/jq", ["jq", "-c", "."]),
        ("/usr/bin/wc", ["wc", "-c"]),
        ("/usr/bin/head", ["head", "-c", "10"]),
        ("/usr/bin/tail", ["tail", "-c", "+1", "-f", "/dev/null"]),
        ("/usr/bin/su", ["su", "envoy", "-c", "true"]),
        ("/usr/bin/flock", ["flock", "/run/lock", "-c", "true"]),
        ("/usr/local/bin/gomplate", ["gomplate", "-c", ".=data.yaml", "--config-path=x"]),
        ("/bin/dash", ["sh", "-c", "exec envoy --restart-epoch 1"]),
        ("/usr/bin/python3.11", ["python3", "/venv/bin/envoy", "--restart-epoch", "0"]),
    ],
)
def test_helpers_are_not_taken_for_envoy(exe: str, argv: list[str]) -> None:
    assert not looks_like_envoy(exe, argv)
    assert not looks_like_envoy(exe, argv, Path("/usr/local/bin/envoy"))


def test_envoy_by_name_by_the_expected_binary_or_by_restart_epoch(tmp_path: Path) -> None:
    assert looks_like_envoy("/usr/local/bin/envoy", ["envoy", "-c", "x"])
    assert looks_like_envoy("/usr/local/bin/envoy (deleted)", ["envoy"])  # binary upgraded
    proxy = tmp_path / "proxy"
    proxy.touch()
    link = tmp_path / "link"
    link.symlink_to(proxy)  # /proc/PID/exe names the resolved file
    assert looks_like_envoy(str(proxy), ["proxy", "-c", "x"], proxy)
    assert looks_like_envoy(str(proxy), ["proxy", "-c", "x"], link)
    assert not looks_like_envoy(str(proxy), ["proxy", "-c", "x"])
    assert looks_like_envoy(str(proxy), ["proxy", "-c", "x", "--restart-epoch", "2"])
    assert looks_like_envoy(str(proxy), ["proxy", "--restart-epoch=2"])


# -- finding 5: /status does not publish the config an error quotes ------------------
SECRET = "-----BEGIN PRIVATE KEY-----MIIEvQ"
WHOLE_CONFIG_ERROR = (
    "validation failed: [critical][main] error initializing config '/etc/envoy.yaml': "
    "Unable to parse JSON as proto (INVALID_ARGUMENT: invalid value 'x' for type "
    'TYPE_UINT32): {"static_resources":{"secrets":[{"name":"tls","inline_string":"'
    + SECRET
    + '}"}],"x":"'
    + "y" * 5000
    + '"}}'
)


def test_status_errors_are_brief_and_never_quote_the_config() -> None:
    telemetry = Telemetry()
    telemetry.restart_done(
        "validation_failed", "SIGHUP", error=WHOLE_CONFIG_ERROR, status="epoch 0 serving"
    )
    shown = telemetry.last_validation_error
    record = telemetry.last_restart_dict()
    assert shown is not None and record is not None
    assert SECRET not in shown and "static_resources" not in shown
    assert shown.startswith("validation failed: [critical][main] error initializing config")
    assert shown.endswith("TYPE_UINT32): {...}") and len(shown) <= 230
    assert record["error"] == shown
    long_error = "cannot bind: " + "z" * 1000
    telemetry.restart_done("start_failed", "SIGHUP", error=long_error, status="x")
    brief = telemetry.last_restart_dict()
    assert brief is not None and isinstance(brief["error"], str)
    assert len(brief["error"]) < 240 and brief["error"].endswith("(truncated, see the log)")


def test_internal_errors_counter_is_registered() -> None:
    telemetry = Telemetry()
    telemetry.internal_errors.inc()
    assert telemetry.registry.get_sample_value("envoy_autoreload_internal_errors_total") == 1
    (family,) = telemetry.internal_errors.describe()
    assert family.documentation


# -- finding 10: Envoy's lines survive --log-level warning ---------------------------
@pytest.fixture
def json_log_at_warning(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    configure_logging("json", "warning")
    yield stream
    root = logging.getLogger("envoy_autoreload")
    root.handlers.clear()
    root.setLevel(logging.NOTSET)
    root.propagate = True
    envoy = logging.getLogger("envoy_autoreload.envoy")
    envoy.setLevel(logging.NOTSET)
    envoy.filters.clear()


def test_envoy_lines_pass_any_log_level_with_envoys_own_level(
    json_log_at_warning: io.StringIO,
) -> None:
    envoy_logger = logging.getLogger("envoy_autoreload.envoy")
    lines = [
        "[2026-01-01 12:00:00.123][41][info][main] [source/server/server.cc:1] starting",
        "[2026-01-01 12:00:00.124][41][critical][backtrace] Caught Segmentation fault",
        "#0: [0x55d] some frame",
    ]
    for line in lines:
        log_event(envoy_logger, logging.INFO, "envoy.output", line, epoch=3, pid=41)
    log_event(logging.getLogger("envoy_autoreload.x"), logging.INFO, "daemon.chatter")
    records = [json.loads(r) for r in json_log_at_warning.getvalue().splitlines()]
    assert [r["message"] for r in records] == lines, "the daemon's own INFO stays filtered"
    assert [r["level"] for r in records] == ["info", "critical", "info"]
    assert all(r["event"] == "envoy.output" and r["epoch"] == 3 for r in records)
