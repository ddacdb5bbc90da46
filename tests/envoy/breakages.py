"""Config mistakes Envoy's validation catches, each with the words Envoy says about it
(ENVOY_FACTS §1)."""

from __future__ import annotations

import re
from collections.abc import Callable


def break_yaml(text: str) -> str:
    return text.replace("routes:", "routes: [", 1)


def unknown_field(text: str) -> str:
    return "bogus_field: 1\n" + text


def unknown_cluster(text: str) -> str:
    return re.sub(
        r"direct_response:\n\s+status: 200\n\s+body: \{[^}]*\}", "route: { cluster: nosuch }", text
    )


BREAKAGES: dict[str, tuple[Callable[[str], str], str]] = {
    "broken_yaml": (break_yaml, "yaml-cpp: error"),
    # Envoy pads this message with a varying number of spaces; match what follows.
    "unknown_field": (unknown_field, "'bogus_field') has unknown fields"),
    "unknown_cluster": (unknown_cluster, "route: unknown cluster 'nosuch'"),
}
