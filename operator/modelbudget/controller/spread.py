"""Where in the reconcile interval each ModelBudget's ticks fall, and which shard acts on it.

kopf starts every timer the moment its object is seen, so after a start (or a leader change)
all ModelBudgets would reconcile together, once per interval, in one burst. Each is instead
given a stable phase from a hash of its namespace/name: its first tick waits that fraction of
the interval, and sharp timers keep it there, so ticks spread evenly over the interval and
group queries (adapters/grouping.py) are shared by members reconciled at different moments.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def stable_fraction(key: str, salt: str) -> float:
    """A fraction in [0, 1) that depends only on ``salt`` and ``key``: the same in every process
    and across restarts (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def phase(namespace: str, name: str, interval: float) -> float:
    """Seconds the first reconcile of ``namespace/name`` waits, in [0, interval)."""
    return stable_fraction(f"{namespace}/{name}", "phase") * interval


@dataclass(frozen=True)
class Shard:
    """This process's part of the work when N operator Deployments split it (``--shards N
    --shard I``): the ModelBudgets whose namespace/name hashes to I, and the GpuPools whose name
    does, each shard with its own Lease. Stable across processes and restarts, so exactly one
    shard ever acts on a ModelBudget, and a shared pool has exactly one writer over all shards."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count}: needs 0 <= shard < shards")

    def owns_model_budget(self, namespace: str, name: str) -> bool:
        return shard_of(f"{namespace}/{name}", self.count) == self.index

    def owns_pool(self, name: str) -> bool:
        return shard_of(f"GpuPool {name}", self.count) == self.index

    def lease_name(self, base: str) -> str:
        """One shard keeps the Lease name it always had; N shards each hold ``<base>-shard-<I>``."""
        return base if self.count == 1 else f"{base}-shard-{self.index}"


def shard_of(key: str, shards: int) -> int:
    """The shard in [0, shards) that acts on ``key``."""
    return min(int(stable_fraction(key, "shard") * shards), shards - 1)
