"""Is the published token limit the limit the gates apply? The verdict behind TokenLimitEnforced.

A knob that nothing enforces is a number in a ConfigMap. The gates report the limit they apply
(one series per gate); the verdict compares that with what was published, allowing the gates
``tokenLimits.enforcementGraceSeconds`` to pick a new value up, and tells the planner the limit
actually in force: the published one while the gates apply it, the highest a gate applies when
they lag behind, and none at all (unbounded) when no gate reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from modelbudget.api.reasons import Reason
from modelbudget.core.observation import GateReport


@dataclass(frozen=True)
class Enforcement:
    reason: Reason  # Enforced, Propagating, Stale, NoGate, or GatesUnknown
    message: str
    limit_in_force: float  # what requests are actually held to now (inf: nothing holds them)
    mismatch_since: datetime | None  # when the gates stopped agreeing with the published limit

    @property
    def plannable(self) -> bool:
        """Can the planner count on the limit it publishes? (Unknown is not a reason to scale up.)"""
        return self.reason in (Reason.ENFORCED, Reason.PROPAGATING, Reason.GATES_UNKNOWN)


def assess_enforcement(
    gates: GateReport | None,
    published: int | None,
    mismatch_since: datetime | None,
    now: datetime,
    grace_seconds: float,
) -> Enforcement:
    if gates is None or gates.error is not None:
        why = "metrics unavailable" if gates is None else gates.error
        return Enforcement(Reason.GATES_UNKNOWN, f"cannot tell what the gates apply: {why}", math.inf, None)
    applied = [x for x in gates.applied_limits if math.isfinite(x)]
    if not applied:
        message = "no gate reports a token limit: nothing enforces it (nor the admission cap)"
        return Enforcement(Reason.NO_GATE, message, math.inf, mismatch_since or now)
    lowest, highest = min(applied), max(applied)
    if published is not None and lowest == highest == published:
        return Enforcement(Reason.ENFORCED, f"{len(applied)} gate(s) apply the published {published}", published, None)
    since = mismatch_since or now
    waited = (now - since).total_seconds()
    seen = f"{lowest:g}" if lowest == highest else f"{lowest:g}..{highest:g}"
    message = f"published {published}, {len(applied)} gate(s) apply {seen} for {waited:.0f}s"
    if waited < grace_seconds:
        return Enforcement(Reason.PROPAGATING, message, max(highest, published or 0), since)
    return Enforcement(Reason.STALE, message, highest, since)
