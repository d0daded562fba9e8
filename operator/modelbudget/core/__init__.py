"""The pure decision core: curve, economics, pacing, dynamics and the planner.

No I/O, no clock reads, no kopf: everything comes in as arguments, so every rule is testable
with tables and properties and the simulator can run the very same ``decide``.
"""

from modelbudget.core.observation import DemandSample, Observation
from modelbudget.core.planner import Decision, ResolvedSpec, decide, resolve

__all__ = ["Decision", "DemandSample", "Observation", "ResolvedSpec", "decide", "resolve"]
