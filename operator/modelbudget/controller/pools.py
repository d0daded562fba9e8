"""One reconcile of one GpuPool: the one writer of a shared pool's provider object. No kopf here.

The claims come from the ModelBudgets' status (the kopf handler hands them in); claims from a
namespace the pool does not allow are ignored, whatever the ModelBudget says. The rules (split,
size, hold, shares) are pure, in core/pools.py; this module reads the provider object, applies
the size once, and turns the settlement into a status patch and Events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from modelbudget.adapters.errors import AdapterError
from modelbudget.adapters.gpupools import GpuPools
from modelbudget.adapters.nodepools import NodePools
from modelbudget.api.pool import GpuPoolSpec, GpuPoolStatus
from modelbudget.api.reasons import Reason
from modelbudget.controller import status as st
from modelbudget.core.pools import Claimant, settle


@dataclass(frozen=True)
class PoolOutcome:
    status: GpuPoolStatus  # as this tick sees it
    status_patch: dict[str, Any] | None  # merge patch for .status; None: nothing to write
    events: list[st.EventNote]


def _status_doc(status: GpuPoolStatus) -> dict[str, Any]:
    doc: dict[str, Any] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return doc


def _previous(raw: Mapping[str, Any]) -> GpuPoolStatus:
    try:
        return GpuPoolStatus.model_validate(dict(raw))
    except ValidationError:
        return GpuPoolStatus()  # settled afresh; the next write replaces it


class PoolReconciler:
    def __init__(self, node_pools: NodePools, gpu_pools: GpuPools) -> None:
        self.node_pools = node_pools
        self.gpu_pools = gpu_pools

    async def _allowed(self, spec: GpuPoolSpec, claimants: Sequence[Claimant]) -> list[Claimant]:
        allowed = []
        labels: dict[str, dict[str, str]] = {}
        for c in claimants:
            if c.namespace not in spec.allowed_namespaces.namespaces and c.namespace not in labels:
                labels[c.namespace] = await asyncio.to_thread(self.gpu_pools.namespace_labels, c.namespace)
            if spec.allowed_namespaces.allows(c.namespace, labels.get(c.namespace, {})):
                allowed.append(c)
        return allowed

    async def reconcile(
        self,
        name: str,
        raw_spec: Mapping[str, Any],
        raw_status: Mapping[str, Any],
        claimants: Sequence[Claimant],
        now: datetime,
    ) -> PoolOutcome:
        old_doc = dict(raw_status)
        before = _previous(raw_status)
        try:
            spec = GpuPoolSpec.model_validate(dict(raw_spec))
        except ValidationError as exc:
            message = f"GpuPool {name}: invalid spec, nothing resized: {exc.errors()[0]['msg']}"[:4096]
            return self._stopped(old_doc, before, message, Reason.INVALID_SPEC, now)
        ref = spec.provider_ref
        try:
            allowed = await self._allowed(spec, claimants)
            sized_now = await asyncio.to_thread(self.node_pools.provider_sized_to, ref, spec.gpus_per_node, "")
        except AdapterError as exc:
            return self._stopped(old_doc, before, f"GpuPool {name}: {exc}", Reason.ACTUATION_FAILED, now)
        settled = settle(spec, allowed, sized_now, before.wanted, now)
        status, events = settled.status, []
        if settled.nodes != sized_now:
            try:
                await asyncio.to_thread(self.node_pools.resize_provider, ref, spec.gpus_per_node, "", settled.nodes)
                events.append(
                    st.EventNote(
                        "Normal", Reason.NODE_POOL_RESIZED, f"GpuPool {name} nodes: {sized_now} -> {settled.nodes}"
                    )
                )
            except AdapterError as exc:
                message = f"GpuPool {name}: {exc}"
                status = status.model_copy(update={"nodes": sized_now, "message": message[:4096]})
                events.append(st.EventNote("Warning", Reason.ACTUATION_FAILED, message))
        if status.split is not None and before.split is None:
            events.append(st.EventNote("Warning", Reason.POOL_SPLIT, status.message or status.split))
        return PoolOutcome(status, st.merge_patch(old_doc, _status_doc(status)) or None, events)

    @staticmethod
    def _stopped(
        old_doc: dict[str, Any], before: GpuPoolStatus, message: str, reason: Reason, now: datetime
    ) -> PoolOutcome:
        """Nothing resized this tick: the grants stand, the status says why (an Event when it is new)."""
        status = before.model_copy(update={"message": message[:4096], "updated_at": now})
        events = [] if before.message == status.message else [st.EventNote("Warning", reason, message)]
        return PoolOutcome(status, st.merge_patch(old_doc, _status_doc(status)) or None, events)
