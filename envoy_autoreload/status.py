"""The status view (`/status`, `envoy-autoreloadctl status`) and systemd's STATUS= line.

Read-only: built from the roster and the telemetry after each event; nothing here
decides or writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from envoy_autoreload import __version__
from envoy_autoreload.envoy_binary import BinaryInfo
from envoy_autoreload.generations import ConfigGeneration
from envoy_autoreload.lineage import Lineage
from envoy_autoreload.ports import Content, EnvoyFacts
from envoy_autoreload.roster import Generation, Roster
from envoy_autoreload.states import SupervisorState
from envoy_autoreload.telemetry import Telemetry


@dataclass(slots=True)
class StatusView:
    roster: Roster
    telemetry: Telemetry
    family: EnvoyFacts
    changes: Content | None
    watch_limit: int | None
    lineage: Lineage
    _last_line: str | None = None

    def publish(self, state: SupervisorState, binary: BinaryInfo | None) -> None:
        """After each event: gauges, /status, and systemd's STATUS= when it changed."""
        serving = self.roster.serving()
        self.telemetry.epoch.set(serving.epoch if serving else -1)
        self.telemetry.generations_alive.set(len(self.roster.alive()))
        line = self.line(state)
        changed = line if line != self._last_line else None
        self.telemetry.publish(self.snapshot(state, binary), changed)
        self._last_line = line

    def snapshot(self, state: SupervisorState, binary: BinaryInfo | None) -> dict[str, object]:
        roster, changes = self.roster, self.changes
        snapshot = changes.snapshot if changes is not None else None
        return {
            "state": state.value,
            "serving": _brief(roster.serving()),
            "draining": [_brief(g) for g in roster.draining()],
            "starting": _brief(roster.starting()),
            "last_good": _config(self.lineage.last_good()),
            "rolled_back_from": _config(self.lineage.rolled_back_from),
            "last_restart": self.telemetry.last_restart_dict(),
            "last_validation_error": self.telemetry.last_validation_error,
            "watched": {"directories": len(snapshot.directories), "files": snapshot.file_count}
            if snapshot is not None
            else None,
            "inotify": {"used": changes.watch_count, "limit": self.watch_limit}
            if changes is not None
            else None,
            "envoy": {
                "version": binary.release if binary else self.family.envoy_version,
                # Not asked of the start-up binary: the running Envoy says it.
                "hot_restart_version": (binary.hot_restart_version if binary else None)
                or self.family.hot_restart_version,
            },
            "daemon": {"pid": os.getpid(), "version": __version__},
        }

    def line(self, state: SupervisorState) -> str:
        """The short line systemd shows: what serves, what drains, what happened last."""
        roster = self.roster
        if state is SupervisorState.STOPPING:
            alive = roster.alive()
            return "stopping" + (
                f": waiting for pids {', '.join(str(g.pid) for g in alive)}" if alive else ""
            )
        serving = roster.serving()
        parts = [_serving_part(serving) if serving else state.value]
        draining = roster.draining()
        if draining:
            parts.append("draining " + ", ".join(f"{g.epoch} (pid {g.pid})" for g in draining))
        last = self.telemetry.last_restart
        if last is not None:
            parts.append(f"last restart: {last.outcome} ({last.reason})")
        return "; ".join(parts)


def _serving_part(serving: Generation) -> str:
    config = f", config {serving.config.short}" if serving.config is not None else ""
    return f"epoch {serving.epoch} serving (pid {serving.pid}{config})"


def _brief(gen: Generation | None) -> dict[str, object] | None:
    if gen is None:
        return None
    brief: dict[str, object] = {"epoch": gen.epoch, "pid": gen.pid}
    if gen.config is not None:
        brief["config_sha256"] = gen.config.sha256
    return brief


def _config(config: ConfigGeneration | None) -> dict[str, str] | None:
    return {"config_sha256": config.sha256} if config is not None else None
