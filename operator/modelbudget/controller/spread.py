"""Where in the reconcile interval each ModelBudget's ticks fall.

kopf starts every timer the moment its object is seen, so after a start (or a leader change)
all ModelBudgets would reconcile together, once per interval, in one burst. Each is instead
given a stable phase from a hash of its namespace/name: its first tick waits that fraction of
the interval, and sharp timers keep it there, so ticks spread evenly over the interval and
group queries (adapters/grouping.py) are shared by members reconciled at different moments.
"""

from __future__ import annotations

import hashlib


def stable_fraction(key: str, salt: str) -> float:
    """A fraction in [0, 1) that depends only on ``salt`` and ``key``: the same in every process
    and across restarts (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def phase(namespace: str, name: str, interval: float) -> float:
    """Seconds the first reconcile of ``namespace/name`` waits, in [0, interval)."""
    return stable_fraction(f"{namespace}/{name}", "phase") * interval
