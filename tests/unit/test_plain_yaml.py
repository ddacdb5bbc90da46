"""`plain_yaml.load_plain` builds exactly what yaml.load builds, or refuses (`NotPlain`)
and leaves the document to yaml.load: on generated documents in every style PyYAML
writes, on the YAML 1.1 scalars a bootstrap may hold, and on what it must refuse."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from envoy_autoreload.envoy_config import parse_bootstrap
from envoy_autoreload.errors import ConfigError
from envoy_autoreload.plain_yaml import NotPlain, load_plain

pytestmark = pytest.mark.skipif(not yaml.__with_libyaml__, reason="needs libyaml")


def loaded(text: str | bytes) -> object:
    return yaml.load(text.encode() if isinstance(text, str) else text, Loader=yaml.CSafeLoader)


def plain(text: str | bytes) -> object:
    return load_plain(text.encode() if isinstance(text, str) else text)


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.sampled_from(["9901", "0o17", "017", "0x1F", "1_000", "1:20", "+1", "-0", "1e3"])
    | st.sampled_from(["on", "off", "yes", "No", "~", "null", "", "2001-12-14", ".inf"])
)
_DOCUMENTS = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_SCALARS, inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(
    document=_DOCUMENTS,
    flow=st.sampled_from([None, True, False]),
    unicode=st.booleans(),
    width=st.sampled_from([20, 80, 1000]),
)
def test_a_generated_document_is_what_yaml_load_builds(
    document: object, flow: bool | None, unicode: bool, width: int
) -> None:
    text = yaml.safe_dump(
        document, default_flow_style=flow, allow_unicode=unicode, width=width, sort_keys=False
    )
    assert _same(plain(text), loaded(text))


def _same(a: object, b: object) -> bool:
    """Equal, and of the same types all the way down (1 == 1.0 == True would pass ==)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(
            _same(ka, kb) and _same(a[ka], b[kb]) for ka, kb in zip(a, b, strict=True)
        )
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# only a comment\n",
        "---\n",
        "just a scalar\n",
        "- 1\n- two\n- [3, {four: 4}]\n",
        "a: 1\na: 2\n",  # a duplicate key: the last wins, in the first one's place
        "port: 9901\nhex: 0x1F\noctal: 017\nsexagesimal: 1:20\nfloat: 6.8523015e+5\n",
        "flags: [on, off, yes, no, true, False, ~, null]\n",
        "when: 2001-12-14\nat: 2001-12-14t21:59:43.10-05:00\n",
        "quoted: '9901'\ndouble: \"on\"\n",
        "? complex key is a scalar\n: value\n",
        "block: |\n  line one\n  line two\nfolded: >\n  one\n  two\n",
        "nan: .nan\n",
        "{flow: mapping, with: [a, sequence]}\n",
        "admin:\n  address:\n    socket_address: { address: 127.0.0.1, port_value: 9901 }\n",
        "\ufeffbom: utf-8\n",
    ],
)
def test_plain_data_is_what_yaml_load_builds(text: str) -> None:
    assert _same(plain(text), loaded(text))


def test_utf16_with_a_bom_is_decoded_as_yaml_load_decodes_it() -> None:
    data = "admin: {port: 1}\n".encode("utf-16")
    assert plain(data) == loaded(data) == {"admin": {"port": 1}}


@pytest.mark.parametrize(
    "text",
    [
        "base: &b {a: 1}\nuse: *b\n",  # anchors and aliases
        "base: {a: 1}\nuse:\n  <<: {b: 2}\n",  # a merge key
        "x: !!str 1\n",  # an explicit tag
        "x: !custom 1\n",
        "? [a, b]\n: 1\n",  # a sequence as a key
        "? {a: 1}\n: 1\n",
        "a: 1\n---\nb: 2\n",  # two documents
        "a: =\n",  # yaml.load's `value` tag, which it cannot construct
        "a: [1, 2\n",  # broken
        "a: b: c\n",
        b"a: \xff\xfe\x00bad\n",  # not UTF-8
    ],
)
def test_anything_else_is_left_to_yaml_load(text: str | bytes) -> None:
    with pytest.raises(NotPlain):
        plain(text)


def test_yaml_loads_own_error_is_the_one_reported(tmp_path: Path) -> None:
    """A broken config's error line is yaml.load's, with its line and column."""
    data = b"static_resources:\n  listeners: [1, 2\n"
    with pytest.raises(yaml.YAMLError) as direct:
        loaded(data)
    with pytest.raises(ConfigError) as through:
        parse_bootstrap(data, tmp_path / "envoy.yaml")
    assert str(direct.value).splitlines()[0] in str(through.value)


def test_the_deepest_document_libyaml_reads() -> None:
    """libyaml stops at 1,000 levels; up to there the document is built."""
    text = "[" * 1000 + "]" * 1000
    document = plain(text)
    for _ in range(999):
        assert isinstance(document, list) and len(document) == 1
        document = document[0]
    assert document == []
    with pytest.raises(NotPlain):
        plain("[" + text + "]")
