"""The simulation logs through the daemon's loggers; keep thousands of runs quiet (a
failure still shows its captured log lines through pytest's logging plugin)."""

from __future__ import annotations

import logging

logging.getLogger("envoy_autoreload").addHandler(logging.NullHandler())
