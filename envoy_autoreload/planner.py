"""The plan (what to start next) and the counters that pace it: one writer, one table.

`Planner.replan` is the only way the plan changes; it checks every move against
`states.PLAN_EDGES`, as a generation's state is checked against its own table. The
supervisor and the exit policy both decide, so both hold the same planner.
"""

from __future__ import annotations

from envoy_autoreload.states import PLAN_EDGES, IllegalMove, Plan, kind_of


class Planner:
    def __init__(self) -> None:
        self.plan: Plan | None = None
        self.drain_wait_over = False  # --max-drain-wait ran out for what waits now
        self.hot_failures = 0  # consecutive failed hot starts of the current request
        self.last_failed_seq = 0  # the newest request a failed start carried
        self.last_start_error = ""

    def replan(self, new: Plan | None, why: str) -> None:
        """Move the plan to `new`; raises IllegalMove for a move no edge allows."""
        edge = (kind_of(self.plan), kind_of(new))
        if why not in PLAN_EDGES.get(edge, frozenset()):
            raise IllegalMove(f"plan {edge[0].value} -> {edge[1].value} ({why}) not allowed")
        self.plan = new
