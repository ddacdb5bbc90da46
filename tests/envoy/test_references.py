"""Files the config names are watched (issue "What operators trip on", item 1): Envoy
reads them once, at start, so a renewed one must restart it; files Envoy writes or
reloads itself must not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.daemon import run_cli
from tests.envoy.conftest import HCM_TYPE, EnvoyFamily
from tests.helpers import wait_until

INLINE = 'body: {{ inline_string: "{body}" }}'
CTL = Path(sys.executable).parent / "envoy-autoreloadctl"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _serves(family: EnvoyFamily, body: str) -> None:
    wait_until(lambda: family.body() == body, timeout_s=30, what=f"{body!r} served")


def test_a_body_file_outside_the_watch_restarts_envoy_when_replaced(
    envoy_family: EnvoyFamily, tmp_path_factory: pytest.TempPathFactory
) -> None:
    body = tmp_path_factory.mktemp("outside-the-watch") / "body.txt"
    body.write_text("from the file, v1")
    text = envoy_family.render("x")
    assert text.count(INLINE.format(body="x")) == 1
    envoy_family.write_raw(text.replace(INLINE.format(body="x"), f'body: {{ filename: "{body}" }}'))
    daemon = envoy_family.start(*envoy_family.watched("--health-window", "0"))
    referenced = daemon.wait_event("watch.referenced")
    assert referenced["files"] == [str(body)]
    daemon.wait_event("child.serving", epoch=0)
    _serves(envoy_family, "from the file, v1")
    _write_atomically(body, "from the file, v2")
    daemon.wait_event("child.serving", epoch=1)
    _serves(envoy_family, "from the file, v2")


def test_no_watch_referenced_leaves_them_alone(
    envoy_family: EnvoyFamily, tmp_path_factory: pytest.TempPathFactory
) -> None:
    body = tmp_path_factory.mktemp("outside-the-watch") / "body.txt"
    body.write_text("from the file, v1")
    text = envoy_family.render("x")
    envoy_family.write_raw(text.replace(INLINE.format(body="x"), f'body: {{ filename: "{body}" }}'))
    daemon = envoy_family.start(
        *envoy_family.watched("--health-window", "0", "--no-watch-referenced")
    )
    daemon.wait_event("child.serving", epoch=0)
    assert not daemon.events("watch.referenced")
    started = daemon.wait_event("watch.started")
    assert str(body) not in started["roots"]


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
TLS_CHAIN = """\
      filter_chains:
        - transport_socket:
            name: envoy.transport_sockets.tls
            typed_config:
              "@type": {tls_type}
              common_tls_context:
                tls_certificates:
                  - certificate_chain: {{ filename: "{cert}" }}
                    private_key: {{ filename: "{key}" }}
          filters:
"""


@pytest.mark.skipif(not Path("/usr/bin/openssl").exists(), reason="needs openssl for a cert")
def test_a_renewed_certificate_outside_the_watch_is_served_at_a_new_epoch(
    envoy_family: EnvoyFamily, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("certs")
    cert, key = _self_signed(outside, "first")
    text = envoy_family.render("tls")
    plain = "      filter_chains:\n        - filters:\n"
    assert text.count(plain) == 1
    tls = TLS_CHAIN.format(cert=cert, key=key, tls_type=TLS_TYPE)
    envoy_family.write_raw(text.replace(plain, tls))
    daemon = envoy_family.start(*envoy_family.watched("--health-window", "0"))
    referenced = daemon.wait_event("watch.referenced")
    assert sorted(referenced["files"]) == sorted([str(cert), str(key)])
    daemon.wait_event("child.serving", epoch=0)
    renewed_cert, renewed_key = _self_signed(outside, "renewed")
    os.replace(renewed_key, key)
    os.replace(renewed_cert, cert)
    daemon.wait_event("child.serving", epoch=1)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0


def _lds(family: EnvoyFamily, body: str) -> str:
    listener = {
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": "main",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": family.listener_port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": HCM_TYPE,
                            "stat_prefix": "main",
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {"@type": ROUTER_TYPE},
                                }
                            ],
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "all",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "match": {"prefix": "/"},
                                                "direct_response": {
                                                    "status": 200,
                                                    "body": {"inline_string": body},
                                                },
                                            }
                                        ],
                                    }
                                ]
                            },
                        },
                    }
                ]
            }
        ],
    }
    return yaml.safe_dump({"resources": [listener]})


def test_a_path_based_xds_file_in_the_watched_tree_restarts_nothing(
    envoy_family: EnvoyFamily,
) -> None:
    """Envoy watches a `path_config_source` itself and applies a change without a
    restart; the daemon must leave it to Envoy."""
    lds = envoy_family.root / "lds.yaml"
    _write_atomically(lds, _lds(envoy_family, "lds v1"))
    bootstrap = {
        "node": {"id": "autoreload-test", "cluster": "autoreload-test"},
        "admin": {
            "address": {
                "socket_address": {"address": "127.0.0.1", "port_value": envoy_family.admin_port}
            }
        },
        "dynamic_resources": {
            "lds_config": {"resource_api_version": "V3", "path_config_source": {"path": str(lds)}}
        },
    }
    envoy_family.write_raw(yaml.safe_dump(bootstrap))
    daemon = envoy_family.start(*envoy_family.watched("--health-window", "0"))
    referenced = daemon.wait_event("watch.referenced")
    assert any(str(lds) in excluded for excluded in referenced["excluded"]), referenced
    daemon.wait_event("child.serving", epoch=0)
    _serves(envoy_family, "lds v1")
    _write_atomically(lds, _lds(envoy_family, "lds v2"))
    _serves(envoy_family, "lds v2")  # Envoy applied it itself
    # A reload compares what is on disk now (events read first) with what serves: the
    # LDS file is no part of it, so nothing changed and nothing restarts.
    reload = subprocess.run(
        [str(CTL), "--control-socket", str(daemon.log_path.with_suffix(".sock")), "reload"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert reload.returncode == 0 and "unchanged" in reload.stdout, reload
    assert not [e for e in daemon.events("child.started") if e["epoch"] > 0]
    assert not [e for e in daemon.events("restart.requested") if e["reason"] == "files_changed"]


def test_check_names_what_is_watched_too_and_what_is_left_out(
    envoy_family: EnvoyFamily, tmp_path_factory: pytest.TempPathFactory
) -> None:
    body = tmp_path_factory.mktemp("outside-the-watch") / "body.txt"
    body.write_text("from the file")
    log = envoy_family.root / "access.log"
    text = envoy_family.render("x", access_log=log)
    envoy_family.write_raw(text.replace(INLINE.format(body="x"), f'body: {{ filename: "{body}" }}'))
    result = run_cli(["--check", *envoy_family.watched(), str(envoy_family.script)])
    assert result.returncode == 0, result.stdout + result.stderr
    referenced = [line for line in result.stdout.splitlines() if " referenced " in line]
    assert any(f"{body}: watched too" in line for line in referenced), result.stdout
    assert any(f"{log}: left out: Envoy writes it" in line for line in referenced), result.stdout


def test_the_watches_follow_a_config_that_names_other_files(
    envoy_family: EnvoyFamily, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("outside-the-watch")
    first, second = outside / "first.txt", outside / "second.txt"
    first.write_text("first")
    second.write_text("second")
    text = envoy_family.render("x")

    def naming(body: Path) -> str:
        return text.replace(INLINE.format(body="x"), f'body: {{ filename: "{body}" }}')

    envoy_family.write_raw(naming(first))
    daemon = envoy_family.start(*envoy_family.watched("--health-window", "0"))
    daemon.wait_event("child.serving", epoch=0)
    envoy_family.write_raw(naming(second))
    daemon.wait_event("child.serving", epoch=1)
    _serves(envoy_family, "second")
    assert daemon.events("watch.referenced")[-1]["files"] == [str(second)]
    _write_atomically(second, "second, renewed")
    daemon.wait_event("child.serving", epoch=2)
    _serves(envoy_family, "second, renewed")
    _write_atomically(first, "first, no longer named")  # restarts nothing
    reload = subprocess.run(
        [str(CTL), "--control-socket", str(daemon.log_path.with_suffix(".sock")), "reload"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert reload.returncode == 0 and "unchanged" in reload.stdout, reload
    assert not [e for e in daemon.events("child.started") if e["epoch"] > 2]


def test_a_file_envoys_command_line_makes_it_write_restarts_nothing(
    envoy_family: EnvoyFamily,
) -> None:
    """`--admin-address-path` inside the watched tree: Envoy writes it at each start,
    which would otherwise be a change to restart for, at every start."""
    written = envoy_family.root / "admin-address.txt"
    script = envoy_family.script.read_text()
    assert script.count("--log-level info") == 1
    envoy_family.script.write_text(
        script.replace("--log-level info", f"--log-level info --admin-address-path {written}")
    )
    daemon = envoy_family.start(*envoy_family.watched("--health-window", "0"))
    daemon.wait_event("child.serving", epoch=0)
    wait_until(written.exists, timeout_s=10, what="Envoy to write its admin address")
    reload = subprocess.run(
        [str(CTL), "--control-socket", str(daemon.log_path.with_suffix(".sock")), "reload"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert reload.returncode == 0 and "unchanged" in reload.stdout, reload
    assert not [e for e in daemon.events("child.started") if e["epoch"] > 0]
