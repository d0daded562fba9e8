"""Leader election on a ``coordination.k8s.io/v1`` Lease, the way client-go does it.

Why a Lease and not kopf peering: kopf peering pauses *every* operator when two of the same
priority meet ("Pausing all operators, including self"), so identical replicas of one Deployment
would all stop; making it work needs distinct priorities per replica plus the peering CRDs.  A
Lease is the cluster's own primitive, needs no CRD, and bounds the takeover time.

Safety: a candidate takes the lease only after the record has not changed for
``lease_duration`` as *it* observed (monotonic clock, so wall-clock skew between hosts does not
matter).  The holder stops acting once its last successful renewal is ``renew_deadline`` old,
which is shorter than ``lease_duration``: the old leader has stopped before a new one can start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime

from modelbudget.adapters.lease import LeaseRecord, LeaseStore

log = logging.getLogger("modelbudget.leader")


def default_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class LeaderElector:
    def __init__(
        self,
        store: LeaseStore,
        identity: str,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError("need retry_period < renew_deadline < lease_duration")
        self.store = store
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self._monotonic = monotonic
        self._wallclock = wallclock
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0
        self._renewed_at: float | None = None  # monotonic time of our last successful write
        self.term = 0  # bumped on every acquisition: state cached under an older term is stale
        # A thread of its own: on the shared default executor, reconciles stuck on a hung
        # Prometheus or apiserver could delay renewals past renew_deadline and drop leadership.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="leader-election")

    @property
    def is_leader(self) -> bool:
        return self._renewed_at is not None and self._monotonic() - self._renewed_at < self.renew_deadline

    def step(self) -> bool:
        """One attempt to acquire or renew; returns whether this process leads now."""
        was_leader = self.is_leader
        try:
            current = self.store.get()
        except Exception as exc:
            log.warning("cannot read the lease: %s", type(exc).__name__)
            return self.is_leader
        now = self._monotonic()
        if current is not None and not current.same_term(self._observed):
            self._observed, self._observed_at = current, now
        mine = current is not None and current.holder == self.identity
        free = current is None or not current.holder
        expired = current is not None and now - self._observed_at >= current.duration_seconds
        if not (mine or free or expired):
            self._renewed_at = None
            return False
        stamp = self._wallclock()
        if current is None:
            record = LeaseRecord(self.identity, int(self.lease_duration), stamp, stamp, 0)
            ok = self._write(self.store.create, record)
        else:
            taking_over = not mine
            record = replace(
                current,
                holder=self.identity,
                duration_seconds=int(self.lease_duration),
                renewed_at=stamp,
                acquired_at=stamp if taking_over else current.acquired_at,
                transitions=current.transitions + (1 if taking_over and current.holder else 0),
            )
            ok = self._write(self.store.update, record)
        if ok:
            self._renewed_at = now
            self._observed, self._observed_at = record, now
            if not was_leader:
                self.term += 1
                log.info("became leader as %s (term %d)", self.identity, self.term)
        elif was_leader and not self.is_leader:
            log.warning("lost the lease")
        return self.is_leader

    @staticmethod
    def _write(fn: Callable[[LeaseRecord], bool], record: LeaseRecord) -> bool:
        try:
            return fn(record)
        except Exception as exc:
            log.warning("cannot write the lease: %s", type(exc).__name__)
            return False

    def release(self) -> None:
        """On a clean shutdown: hand the lease back so a standby need not wait for it to expire."""
        if not self.is_leader:
            return
        self._renewed_at = None
        try:
            current = self.store.get()
        except Exception:
            return  # it expires on its own
        if current is not None and current.holder == self.identity:
            self._write(self.store.update, replace(current, holder=None))

    async def run(self, on_change: Callable[[bool], None] | None = None) -> None:
        """Acquire and renew until cancelled; the store is synchronous, so it runs in a thread."""
        leading = False
        loop = asyncio.get_running_loop()
        try:
            while True:
                now_leading = await loop.run_in_executor(self._thread, self.step)
                if now_leading != leading and on_change is not None:
                    on_change(now_leading)
                leading = now_leading
                await asyncio.sleep(self.retry_period)
        finally:
            await loop.run_in_executor(self._thread, self.release)
            if on_change is not None:
                on_change(False)
