"""Which file names are editor or tool droppings, never configuration.

Filters only save wakeups: the content digest decides whether anything changed, so a
missed filter costs a rescan, never a restart. They must never swallow Kubernetes'
`..data` and `..<timestamp>` entries (a ConfigMap update is a rename of `..data`), which
is why there is no blanket dot-file rule (uvicorn's `.*` would hide them).

Defaults follow watchfiles' DefaultFilter, extended with what the editors we saw do:
- vim: `.name.swp`/`.swx`/`.swo` swap files, `name~` backups, and the `4913` probe file
  it creates to test whether the directory is writable;
- emacs: `#name#` autosaves, `.#name` lock symlinks, `name~` backups;
- kate `.name.kate-swp`; JetBrains `name___jb_tmp___`/`___jb_old___`; gedit
  `.goutputstream-XXXXXX`; macOS `.DS_Store`; `*.tmp` temp files (VS Code, our tests,
  many push tools write a temp file and rename it over the target).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Final

DEFAULT_IGNORE_GLOBS: Final[tuple[str, ...]] = (
    "*.swp",
    "*.swx",
    "*.swo",
    "*~",
    ".#*",
    "#*#",
    "4913",
    "*.tmp",
    ".*.kate-swp",
    "*___jb_tmp___",
    "*___jb_old___",
    ".goutputstream-*",
    ".DS_Store",
)


class NoiseFilter:
    """Answers whether a file name (not a path) should be ignored."""

    def __init__(self, extra_globs: Iterable[str] = ()) -> None:
        self.globs: tuple[str, ...] = DEFAULT_IGNORE_GLOBS + tuple(extra_globs)
        # One regular expression for all globs: asked once per file of every walk,
        # a glob at a time was most of a 100,000-file walk's time (issue 16).
        # Never a name that starts with "..": kubelet's ..data and ..<timestamp> are the
        # ConfigMap swap itself. `match` is the bare C call, for the walk's inner loop.
        globs = "|".join(fnmatch.translate(g) for g in self.globs)
        self.match: Final = re.compile(rf"(?!\.\.)(?:{globs})").match
        # A file the walk never hashes: noise, or one of kubelet's `..` names.
        self.skips_file: Final = re.compile(rf"\.\.|(?:{globs})").match

    def is_noise(self, name: str) -> bool:
        return self.match(name) is not None
