"""Pure parsing: exit descriptions, Envoy command lines, admin addresses."""

from __future__ import annotations

from pathlib import Path

import pytest

from envoy_autoreload.addresses import AdminAddress, parse_admin_address
from envoy_autoreload.command import describe_exit
from envoy_autoreload.envoy_config import admin_address_from_config
from envoy_autoreload.envoy_process import parse_envoy_argv
from envoy_autoreload.errors import ConfigError, UsageError
from envoy_autoreload.states import ALLOWED_TRANSITIONS, GenerationState


@pytest.mark.parametrize(
    ("returncode", "text"),
    [
        (0, "exit status 0"),
        (1, "exit status 1"),
        (-9, "killed by SIGKILL"),
        (-6, "killed by SIGABRT"),
    ],
)
def test_describe_exit(returncode: int, text: str) -> None:
    assert describe_exit(returncode) == text


def test_exited_is_final_and_starting_cannot_drain() -> None:
    assert ALLOWED_TRANSITIONS[GenerationState.EXITED] == frozenset()
    assert GenerationState.DRAINING not in ALLOWED_TRANSITIONS[GenerationState.STARTING]


def test_envoy_argv_both_flag_spellings() -> None:
    line = parse_envoy_argv(
        [
            "envoy",
            "-c",
            "/etc/envoy.yaml",
            "--base-id=7",
            "--restart-epoch",
            "3",
            "--parent-shutdown-time-s",
            "2",
            "--use-dynamic-base-id",
            "--base-id-path",
            "/run/id",
        ]
    )
    assert line.config_path == "/etc/envoy.yaml"
    assert line.base_id == 7
    assert line.restart_epoch == 3
    assert line.parent_shutdown_time_s == 2.0
    assert line.use_dynamic_base_id
    assert line.base_id_path == "/run/id"
    assert parse_envoy_argv(["--config-path=/x.yaml"]).config_path == "/x.yaml"
    assert parse_envoy_argv(["--base-id", "notanumber"]).base_id is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9901", AdminAddress("127.0.0.1", 9901)),
        ("0.0.0.0:9901", AdminAddress("127.0.0.1", 9901)),
        ("[::1]:9901", AdminAddress("::1", 9901)),
        ("localhost:80\n", AdminAddress("localhost", 80)),
    ],
)
def test_parse_admin_address(text: str, expected: AdminAddress) -> None:
    assert parse_admin_address(text) == expected


def test_parse_admin_address_rejects_garbage() -> None:
    with pytest.raises(UsageError, match="not HOST:PORT"):
        parse_admin_address("9901")


def test_admin_address_from_yaml_and_json(tmp_path: Path) -> None:
    yaml_config = tmp_path / "a.yaml"
    yaml_config.write_text(
        "admin:\n  address:\n    socket_address: { address: 0.0.0.0, port_value: 9901 }\n"
    )
    assert admin_address_from_config(yaml_config) == AdminAddress("127.0.0.1", 9901)
    json_config = tmp_path / "a.json"
    json_config.write_text(
        '{"admin": {"address": {"socket_address": {"address": "127.0.0.2", "port_value": 1}}}}'
    )
    assert admin_address_from_config(json_config) == AdminAddress("127.0.0.2", 1)


def test_admin_address_absent_or_unusable(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("static_resources: {}\n")
    assert admin_address_from_config(config) is None
    config.write_text("admin:\n  address:\n    socket_address: { port_value: 0 }\n")
    assert admin_address_from_config(config) is None


def test_admin_address_from_broken_or_missing_config_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("admin: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        admin_address_from_config(broken)
    assert "\n" not in str(info.value) and "broken.yaml" in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        admin_address_from_config(tmp_path / "missing.yaml")


def test_the_flags_that_change_what_a_config_means_are_kept_for_validation() -> None:
    """A snapshot validated without the serving Envoy's --config-yaml overlay or node
    flags would be judged as another config than the one that runs."""
    line = parse_envoy_argv(
        [
            "envoy",
            "-c",
            "/etc/envoy/envoy.yaml",
            "--service-cluster=edge",
            "--config-yaml",
            "admin: {address: {socket_address: {port_value: 9902}}}",
            "--service-node",
            "edge-1",
            "--restart-epoch",
            "3",
        ]
    )
    assert line.config_flags == (
        "--config-yaml",
        "admin: {address: {socket_address: {port_value: 9902}}}",
        "--service-node",
        "edge-1",
        "--service-cluster",
        "edge",
    )
    assert parse_envoy_argv(["envoy", "-c", "/x.yaml"]).config_flags == ()
