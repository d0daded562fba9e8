"""The forecast's headroom where the cluster's autoscaler reads it: a SIG Autoscaling
``CapacityBuffer`` (``autoscaling.x-k8s.io/v1beta1``; its CRD ships in ``sigs.k8s.io/karpenter``
v1.15 and Cluster Autoscaler serves it too).

One buffer per ModelBudget, named after it, in its namespace, owned by it (an ownerReference: it
goes when the ModelBudget goes) and labelled as the operator's.  ``scalableRef`` is the
ModelBudget's target Deployment, so each placeholder pod (a "chunk") is shaped like a serving pod,
and ``replicas`` is the number of chunks: the autoscaler provisions nodes for them ahead of demand,
and a real pod preempts a placeholder when it needs the room.  ``replicas`` is always written, 0
included: a buffer without ``replicas`` or ``percentage`` is sized by its ``limits`` alone.

A buffer of that name that is not the operator's is never written.  The operator never deletes
a buffer: one no longer wanted is set to 0, and goes with its ModelBudget (garbage collection).  Reads come from a
watched mirror of the operator's buffers in the namespace (no request per reconcile); a write
reads the object first and writes nothing when it already has what is asked.  Whether the
cluster serves the API at all is asked through discovery, again after ``DISCOVERY_SECONDS``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, cast

from modelbudget.adapters.errors import AdapterError, NotFound, Rejected
from modelbudget.adapters.kube import KubeClients, kube_errors
from modelbudget.adapters.tokenlimit import MANAGED_BY, MANAGED_BY_SELECTOR
from modelbudget.adapters.watchcache import PerNamespace, WatchCache, keep, labels_match
from modelbudget.api.spec import API_VERSION as OWNER_API_VERSION
from modelbudget.api.spec import KIND as OWNER_KIND

GROUP = "autoscaling.x-k8s.io"
VERSION = "v1beta1"
PLURAL = "capacitybuffers"
KIND = "CapacityBuffer"
DISCOVERY_SECONDS = 60.0  # a CRD installed (or removed) later is noticed within this


@dataclass(frozen=True)
class Owner:
    """The ModelBudget a buffer belongs to."""

    name: str
    uid: str


@dataclass(frozen=True)
class Buffer:
    """What the operator sets on a CapacityBuffer."""

    target: str  # the Deployment its scalableRef names ("": it names no Deployment)
    replicas: int | None  # None: not sized by replicas alone (a percentage, a podTemplateRef, limits)


class CapacityBuffers(Protocol):
    def served(self) -> bool:
        """Whether the apiserver serves CapacityBuffers (autoscaling.x-k8s.io/v1beta1)."""
        ...

    def read(self, namespace: str, name: str) -> Buffer | None:
        """The operator's buffer of that name as it is now; None when there is none."""
        ...

    def apply(self, namespace: str, name: str, owner: Owner, wanted: Buffer) -> bool:
        """Create or update the buffer; True when it was written, False when it had ``wanted``
        already.  Raises ``Rejected``, changing nothing, when a buffer of that name is not the
        operator's, and ``NotFound`` when the API is not served."""
        ...


def owner_references(owner: Owner) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": OWNER_API_VERSION,
            "kind": OWNER_KIND,
            "name": owner.name,
            "uid": owner.uid,
            "controller": True,
            "blockOwnerDeletion": False,  # deleting the ModelBudget never waits for its buffer
        }
    ]


def manifest(namespace: str, name: str, owner: Owner, wanted: Buffer) -> dict[str, Any]:
    """The whole CapacityBuffer, as created."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(MANAGED_BY),
            "ownerReferences": owner_references(owner),
        },
        "spec": _spec(wanted),
    }


def _owned_by(obj: dict[str, Any], owner: Owner) -> bool:
    return any(ref.get("uid") == owner.uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def _spec(wanted: Buffer) -> dict[str, Any]:
    return {
        "scalableRef": {"apiGroup": "apps", "kind": "Deployment", "name": wanted.target},
        "replicas": wanted.replicas,
    }


def buffer_of(obj: dict[str, Any]) -> Buffer:
    """What a CapacityBuffer carries of what the operator sets."""
    spec = obj.get("spec") or {}
    ref = spec.get("scalableRef") or {}
    deployment = ref.get("kind") == "Deployment" and ref.get("apiGroup") == "apps"
    replicas = spec.get("replicas")
    alone = isinstance(replicas, int) and "percentage" not in spec and "podTemplateRef" not in spec
    return Buffer(target=str(ref.get("name", "")) if deployment else "", replicas=replicas if alone else None)


def _spec_fields(obj: dict[str, Any]) -> dict[str, Any]:
    return keep(obj, "spec.scalableRef", "spec.replicas", "spec.percentage", "spec.podTemplateRef")


class KubeCapacityBuffers:
    def __init__(self, kube: KubeClients, clock: Callable[[], float] = time.monotonic) -> None:
        self._custom = kube.custom
        self._clock = clock
        self._lock = threading.Lock()
        self._served: tuple[bool, float] | None = None  # the answer, and when it was asked
        self._mirror = PerNamespace(
            lambda namespace: WatchCache(
                f"modelbudget's CapacityBuffers in {namespace}",
                partial(
                    self._custom.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    label_selector=MANAGED_BY_SELECTOR,
                ),
                trim=_spec_fields,
            )
        )

    def served(self) -> bool:
        with self._lock:
            if self._served is not None and self._clock() - self._served[1] < DISCOVERY_SECONDS:
                return self._served[0]
        try:
            with kube_errors(f"discovering {GROUP}/{VERSION}"):
                answer = self._custom.get_api_resources(GROUP, VERSION)
            served = any(r.name == PLURAL for r in answer.resources or [])
        except NotFound:  # the group/version is not served at all
            served = False
        except AdapterError:
            # A discovery that failed says nothing: the last answer stands (headroom does not move
            # between a buffer and replicas on a blip), and is asked again next time.
            with self._lock:
                if self._served is not None:
                    return self._served[0]
            raise
        with self._lock:
            self._served = (served, self._clock())
        return served

    def read(self, namespace: str, name: str) -> Buffer | None:
        obj = self._mirror(namespace).get(namespace, name)
        return None if obj is None else buffer_of(obj)

    def _get(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            with kube_errors(f"reading {KIND} {namespace}/{name}"):
                got = self._custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            return cast(dict[str, Any], got)  # a custom object is its JSON, as a dict
        except NotFound:
            return None

    def apply(self, namespace: str, name: str, owner: Owner, wanted: Buffer) -> bool:
        where = f"{KIND} {namespace}/{name}"
        existing = self._get(namespace, name)
        if existing is None:
            with kube_errors(f"creating {where}"):  # a Conflict if someone created it meanwhile
                self._custom.create_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, manifest(namespace, name, owner, wanted)
                )
            return True
        if not labels_match(existing, MANAGED_BY):
            raise Rejected(
                f"{where} exists and is not managed by modelbudget, so it is left unchanged: delete or rename "
                f"it, or label it {MANAGED_BY_SELECTOR} to let the operator write it"
            )
        if buffer_of(existing) == wanted and _owned_by(existing, owner):
            return False
        # Conditional on the version read: a buffer changed meanwhile is a Conflict, retried next tick.
        # percentage and podTemplateRef are cleared: either would size the buffer besides replicas.
        # The owner is set again: a ModelBudget deleted and created anew has another uid.
        patch = {
            "metadata": {
                "resourceVersion": existing["metadata"].get("resourceVersion"),
                "ownerReferences": owner_references(owner),
            },
            "spec": {**_spec(wanted), "percentage": None, "podTemplateRef": None},
        }
        with kube_errors(f"updating {where}"):
            self._custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)
        return True
