"""Which files a bootstrap makes Envoy read at start (watched), and which are left out."""

from __future__ import annotations

from pathlib import Path

from envoy_autoreload.references import (
    WATCHED_BY_ENVOY,
    WRITTEN_BY_ENVOY,
    files_envoy_reads,
    relative_names_trap,
)

FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"

BOOTSTRAP: dict[str, object] = {
    "static_resources": {
        "listeners": [
            {
                "filter_chains": [
                    {
                        "transport_socket": {
                            "typed_config": {
                                "common_tls_context": {
                                    "tls_certificates": [
                                        {
                                            "certificate_chain": {"filename": "/etc/tls/a.crt"},
                                            "private_key": {"filename": "/etc/tls/a.key"},
                                        }
                                    ],
                                    "validation_context": {
                                        "trusted_ca": {"filename": "ca.pem"},
                                        "crl": {"filename": "/etc/tls/crl.pem"},
                                    },
                                }
                            }
                        },
                        "filters": [
                            {
                                "typed_config": {
                                    "access_log": [
                                        {
                                            "typed_config": {
                                                "@type": FILE_LOG,
                                                "path": "/var/log/a.log",
                                            }
                                        },
                                        {
                                            "typed_config": {
                                                "@type": FILE_LOG,
                                                "path": "/dev/stdout",
                                            }
                                        },
                                    ],
                                    "http_filters": [
                                        {
                                            "typed_config": {
                                                "default_source_code": {"filename": "/lua/f.lua"}
                                            }
                                        }
                                    ],
                                    "route_config": {
                                        "virtual_hosts": [
                                            {
                                                "routes": [
                                                    {
                                                        "direct_response": {
                                                            "body": {"filename": "/srv/b.txt"}
                                                        }
                                                    }
                                                ]
                                            }
                                        ]
                                    },
                                }
                            }
                        ],
                    }
                ]
            }
        ],
        "secrets": [
            {
                "name": "rotating",
                "tls_certificate": {
                    "watched_directory": {"path": "/etc/sds"},
                    "certificate_chain": {"filename": "/etc/sds/tls.crt"},
                },
            }
        ],
    },
    "dynamic_resources": {"cds_config": {"path_config_source": {"path": "/etc/envoy/cds.yaml"}}},
}


def test_start_time_inputs_are_watched_and_envoys_own_files_are_not() -> None:
    refs = files_envoy_reads(BOOTSTRAP, Path("/run/envoy"))
    assert refs.reads == {
        Path("/etc/tls/a.crt"),
        Path("/etc/tls/a.key"),
        Path("/run/envoy/ca.pem"),  # relative: from Envoy's working directory
        Path("/etc/tls/crl.pem"),
        Path("/lua/f.lua"),
        Path("/srv/b.txt"),
    }
    assert dict(refs.excluded) == {
        Path("/var/log/a.log"): WRITTEN_BY_ENVOY,
        Path("/etc/sds/tls.crt"): WATCHED_BY_ENVOY,
        Path("/etc/envoy/cds.yaml"): WATCHED_BY_ENVOY,
    }


def test_a_config_naming_nothing_watches_nothing_more() -> None:
    refs = files_envoy_reads({"admin": {"address": {}}}, Path("/"))
    assert refs.reads == frozenset() and refs.excluded == ()


def test_every_relative_name_is_kept_as_written() -> None:
    """Read, written (an access log) or watched by Envoy itself (an xDS file): each is
    taken from Envoy's working directory, which the daemon cannot see before it runs."""
    config: dict[str, object] = {
        "admin": {"access_log_path": "logs/admin.log"},
        "node": {"metadata": {"body": {"filename": "/abs/ignored.txt"}}},
        "x": [{"filename": "tls/a.crt"}, {"filename": "./ca.pem"}, {"filename": "/dev/null"}],
        "dynamic_resources": {"lds_config": {"path": "lds.yaml"}},
    }
    refs = files_envoy_reads(config, Path("/run/envoy"))
    assert refs.relative == ("./ca.pem", "lds.yaml", "logs/admin.log", "tls/a.crt")
    assert files_envoy_reads(BOOTSTRAP, Path("/")).relative == ("ca.pem",)


def test_the_trap_names_both_directories_once_envoy_runs() -> None:
    names = ("a", "b", "c", "d")
    before = relative_names_trap(names, Path("/srv"), None)
    assert "(a, b, c and 1 more)" in before and "from its own, /srv" in before
    running = relative_names_trap(names, Path("/srv"), Path("/etc/envoy"))
    assert "Envoy runs in /etc/envoy, the daemon, which validates and watches them, in /srv" in (
        running
    )
