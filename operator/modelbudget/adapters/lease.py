"""The leader-election Lease (``coordination.k8s.io/v1``): the record the elector reads and writes,
and the store it goes through."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from kubernetes import client

from modelbudget.adapters.errors import Conflict, NotFound
from modelbudget.adapters.kube import KubeClients, kube_errors


@dataclass(frozen=True)
class LeaseRecord:
    holder: str | None
    duration_seconds: int
    acquired_at: datetime | None = None
    renewed_at: datetime | None = None
    transitions: int = 0
    resource_version: str | None = None  # for optimistic concurrency

    def same_term(self, other: LeaseRecord | None) -> bool:
        return other is not None and (self.holder, self.renewed_at) == (other.holder, other.renewed_at)


class LeaseStore(Protocol):
    def get(self) -> LeaseRecord | None: ...

    def create(self, record: LeaseRecord) -> bool:
        """False if someone else created it first."""
        ...

    def update(self, record: LeaseRecord) -> bool:
        """False if the record changed since it was read (``resource_version``)."""
        ...


def _aware(t: datetime | None) -> datetime | None:
    return t if t is None or t.tzinfo is not None else t.replace(tzinfo=UTC)


class KubeLeaseStore:
    def __init__(self, kube: KubeClients, namespace: str, name: str) -> None:
        self._api = kube.coordination
        self.namespace = namespace
        self.name = name
        self._what = f"Lease {namespace}/{name}"

    def get(self) -> LeaseRecord | None:
        try:
            with kube_errors(self._what):
                lease = self._api.read_namespaced_lease(self.name, self.namespace)
        except NotFound:
            return None
        spec = lease.spec or client.V1LeaseSpec()
        return LeaseRecord(
            holder=spec.holder_identity,
            duration_seconds=spec.lease_duration_seconds or 15,
            acquired_at=_aware(spec.acquire_time),
            renewed_at=_aware(spec.renew_time),
            transitions=spec.lease_transitions or 0,
            resource_version=lease.metadata.resource_version if lease.metadata else None,
        )

    def _lease(self, r: LeaseRecord) -> client.V1Lease:
        return client.V1Lease(
            metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace, resource_version=r.resource_version),
            spec=client.V1LeaseSpec(
                holder_identity=r.holder,
                lease_duration_seconds=r.duration_seconds,
                acquire_time=r.acquired_at,
                renew_time=r.renewed_at,
                lease_transitions=r.transitions,
            ),
        )

    def create(self, record: LeaseRecord) -> bool:
        try:
            with kube_errors(self._what):
                self._api.create_namespaced_lease(self.namespace, self._lease(record))
        except Conflict:
            return False
        return True

    def update(self, record: LeaseRecord) -> bool:
        try:
            with kube_errors(self._what):
                self._api.replace_namespaced_lease(self.name, self.namespace, self._lease(record))
        except Conflict:
            return False
        return True
