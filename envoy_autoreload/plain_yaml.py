"""A YAML document of plain data built straight from libyaml's parse events: the big
bootstraps the daemon reads, read in a fraction of yaml.load's time (issue 16).

PyYAML's CSafeLoader parses in C but composes nodes and constructs objects in Python:
2.3 s for a 4.9 MB bootstrap here, of which libyaml's events are 0.28 s. That time is
on a big config's restart path: its verdict waits for the files the config names
(`bootstrap_facts.py`), and the parse outlasted Envoy's validation by 1.3 s. An Envoy
bootstrap is plain data (mappings, sequences, scalars), so it is built here from the
events, with a stack rather than recursion, each distinct scalar resolved once, by
PyYAML's own resolver and constructor: `9901` is the same int, `on` the same bool and
`2001-12-14` the same date as yaml.load gives.

Anything beyond plain data raises `NotPlain`, and the caller uses yaml.load: an anchor
or alias, an explicit tag, a merge key (`<<`) or `=`, a key that is a mapping or a
sequence, more than one document, and any error, so an error message is always
yaml.load's own. The document is always what yaml.load gives
(tests/unit/test_plain_yaml.py holds it to that on generated documents).
"""

from __future__ import annotations

from typing import Final

import yaml

_STR: Final = "tag:yaml.org,2002:str"
# The scalar types a resolved plain scalar may take here; any other (merge, value)
# is left to yaml.load.
_CONSTRUCTED: Final = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("int", "float", "bool", "null", "timestamp")
)
_NO_KEY: Final = object()  # a mapping whose next scalar is a key


class NotPlain(Exception):
    """The document holds more than plain data (or is broken): use yaml.load."""


class _Scalars:
    """Each distinct scalar resolved and constructed once: a bootstrap repeats most."""

    def __init__(self) -> None:
        self._resolver = yaml.resolver.Resolver()
        self._constructor = yaml.constructor.SafeConstructor()
        self._seen: dict[tuple[str, bool, bool], object] = {}

    def value(self, event: yaml.ScalarEvent) -> object:
        plain, quoted = event.implicit
        key = (event.value, plain, quoted)
        try:
            return self._seen[key]
        except KeyError:
            pass
        resolve = self._resolver.resolve  # untyped in types-PyYAML
        tag = resolve(yaml.ScalarNode, event.value, (plain, quoted))  # type: ignore[no-untyped-call]
        if tag == _STR:
            value: object = event.value
        elif tag in _CONSTRUCTED:
            value = self._constructor.construct_object(yaml.ScalarNode(tag, event.value))
        else:
            raise NotPlain(f"a scalar resolved to {tag}")
        self._seen[key] = value
        return value


class _Builder:
    """The document under construction: open collections, and each open mapping's key."""

    def __init__(self) -> None:
        self.documents: list[object] = []
        self._open: list[dict[object, object] | list[object]] = []
        self._keys: list[object] = []  # one per open mapping

    def add(self, value: object) -> None:
        if not self._open:
            self.documents.append(value)
            return
        parent = self._open[-1]
        if isinstance(parent, list):
            parent.append(value)
        elif self._keys[-1] is _NO_KEY:
            if isinstance(value, dict | list):
                raise NotPlain("a mapping or sequence as a key")
            self._keys[-1] = value
        else:
            parent[self._keys[-1]] = value
            self._keys[-1] = _NO_KEY

    def open(self, collection: dict[object, object] | list[object]) -> None:
        self.add(collection)
        self._open.append(collection)
        if isinstance(collection, dict):
            self._keys.append(_NO_KEY)

    def close(self) -> None:
        if isinstance(self._open.pop(), dict):
            self._keys.pop()


def load_plain(data: bytes) -> object:
    """The single document in `data`, as yaml.load would build it; `NotPlain` when it
    holds anything but plain data, is broken, or libyaml is not installed."""
    if not yaml.__with_libyaml__:
        raise NotPlain("libyaml is not installed")
    try:
        return _build(data)
    except NotPlain:
        raise
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as err:
        raise NotPlain(f"{type(err).__name__}: leave it to yaml.load") from err


def _build(data: bytes) -> object:
    scalars, builder, documents_seen = _Scalars(), _Builder(), 0
    for event in yaml.parse(data, Loader=yaml.CSafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise NotPlain("an anchor or alias")
        if getattr(event, "tag", None) not in (None, "!"):
            raise NotPlain("an explicit tag")
        if isinstance(event, yaml.ScalarEvent):
            builder.add(scalars.value(event))
        elif isinstance(event, yaml.MappingStartEvent):
            builder.open({})
        elif isinstance(event, yaml.SequenceStartEvent):
            builder.open([])
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            builder.close()
        elif isinstance(event, yaml.DocumentStartEvent):
            documents_seen += 1
            if documents_seen > 1:
                raise NotPlain("more than one document")
    return builder.documents[0] if builder.documents else None
