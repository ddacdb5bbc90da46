"""What a bootstrap names, read in one go: the admin address, the files Envoy reads and
writes, and a one-line error for what cannot be read; and the child's JSON answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from envoy_autoreload.addresses import AdminAddress
from envoy_autoreload.bootstrap_facts import (
    BootstrapFacts,
    from_json,
    identity_of,
    main,
    read_facts,
    to_json,
)
from envoy_autoreload.references import WRITTEN_BY_ENVOY

CONFIG = """\
admin:
  address:
    socket_address: { address: 0.0.0.0, port_value: 9901 }
static_resources:
  listeners:
    - name: main
      filter_chains:
        - filters:
            - name: hcm
              typed_config:
                access_log:
                  - typed_config:
                      "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.\
FileAccessLog
                      path: logs/access.log
          transport_socket:
            typed_config:
              common_tls_context:
                tls_certificates:
                  - certificate_chain: { filename: /etc/certs/chain.pem }
"""


def test_the_facts_of_a_config(tmp_path: Path) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(CONFIG)
    facts = read_facts(config, tmp_path)
    assert facts.error is None
    assert facts.identity == identity_of(config)
    assert facts.admin == AdminAddress("127.0.0.1", 9901)
    assert facts.references is not None
    assert facts.references.reads == {Path("/etc/certs/chain.pem")}
    assert facts.references.excluded == ((tmp_path / "logs/access.log", WRITTEN_BY_ENVOY),)


def test_what_cannot_be_read_or_parsed_is_one_line(tmp_path: Path) -> None:
    missing = read_facts(tmp_path / "gone.yaml", tmp_path)
    assert missing == BootstrapFacts(
        tmp_path / "gone.yaml",
        None,
        None,
        None,
        f"cannot read Envoy config {tmp_path / 'gone.yaml'}: No such file or directory",
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("admin: [unclosed\n")
    facts = read_facts(broken, tmp_path)
    assert facts.error is not None and facts.error.startswith("cannot parse Envoy config")
    assert "\n" not in facts.error
    assert facts.references is None and facts.admin is None
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    assert read_facts(scalar, tmp_path).references is None


def test_the_childs_answer_round_trips(tmp_path: Path) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(CONFIG)
    for path in (config, tmp_path / "gone.yaml"):
        facts = read_facts(path, tmp_path)
        assert from_json(to_json(facts), path) == facts
    references = read_facts(config, tmp_path).references
    assert references is not None and references.relative == ("logs/access.log",)


def test_the_child_entry_prints_one_json_object(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(CONFIG)
    assert main([str(config), str(tmp_path)]) == 0
    out = capfd.readouterr().out
    assert out.count("\n") == 1
    assert from_json(out, config) == read_facts(config, tmp_path)
