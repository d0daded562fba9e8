"""Where users route: the variants' traffic shares as backend weights on a Gateway API HTTPRoute.

The operator owns the ``weight`` of the backendRefs that point at the variants' Services -- in
every rule that carries them -- and nothing else of the route: other backendRefs, matches,
filters and the rest stay as their owner wrote them. Each write is a JSON patch that touches only
those weights, guarded by a ``test`` of each backendRef's Service name, so an edit made meanwhile
to another field is kept and a reordered list is never written at stale positions (the route is
read again and the patch rebuilt). Nothing is written when the weights already match.

Weight 0 keeps the backendRef: in the Gateway API a backendRef with weight 0 gets no traffic,
and keeping it lets the next plan send traffic back without recreating anything.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

from kubernetes.client.exceptions import ApiException

from modelbudget.adapters.errors import Conflict, NotFound, Rejected
from modelbudget.adapters.kube import KubeClients, kube_errors

GROUP = "gateway.networking.k8s.io"
VERSION = "v1"
PLURAL = "httproutes"
DEFAULT_WEIGHT = 1  # Gateway API: a backendRef without a weight has weight 1
MAX_WEIGHT = 1_000_000  # the HTTPRoute schema's bound
JSON_PATCH = "application/json-patch+json"
PATCH_ATTEMPTS = 3  # a route reordered under us is read again, a few times at most


class RouteNotFound(NotFound):
    """The HTTPRoute does not exist (or the Gateway API CRDs are not installed)."""


class BackendNotInRoute(Rejected):
    """The route has no backendRef to some of the variants' Services: their share cannot be routed."""

    def __init__(self, route: str, missing: Collection[str]) -> None:
        self.missing = sorted(missing)
        super().__init__(
            f"{route} has no backendRef to Service {', '.join(self.missing)}: add one (weight 0 sends it "
            "no traffic) so the variant's share can be routed; nothing was changed"
        )


@dataclass(frozen=True)
class BackendSlot:
    """One backendRef to a Service in the route's namespace: where it is, and its weight now."""

    rule: int
    index: int
    service: str
    weight: int

    @property
    def path(self) -> str:
        return f"/spec/rules/{self.rule}/backendRefs/{self.index}"


class TrafficRouter(Protocol):
    def weights(self, namespace: str, route: str, services: Collection[str]) -> dict[str, int | None]:
        """The weight in force for each of ``services``: the one all its backendRefs carry, or None
        when the rules disagree. Raises ``RouteNotFound`` or ``BackendNotInRoute``."""
        ...

    def publish(self, namespace: str, route: str, weights: Mapping[str, int]) -> bool:
        """Set the weight of every backendRef to each Service in ``weights`` (Service -> weight);
        True when the route was written, False when it already carried them."""
        ...


def backend_slots(route: Mapping[str, Any]) -> list[BackendSlot]:
    """Every backendRef of the route that names a Service in the route's own namespace."""
    namespace = (route.get("metadata") or {}).get("namespace")
    slots = []
    for r, rule in enumerate((route.get("spec") or {}).get("rules") or []):
        for i, ref in enumerate(rule.get("backendRefs") or []):
            is_service = ref.get("group", "") == "" and ref.get("kind", "Service") == "Service"
            if is_service and ref.get("namespace", namespace) == namespace and "name" in ref:
                slots.append(BackendSlot(r, i, ref["name"], int(ref.get("weight", DEFAULT_WEIGHT))))
    return slots


def _missing(where: str, slots: list[BackendSlot], services: Collection[str]) -> None:
    missing = set(services) - {s.service for s in slots}
    if missing:
        raise BackendNotInRoute(where, missing)


def weights_in_force(where: str, route: Mapping[str, Any], services: Collection[str]) -> dict[str, int | None]:
    slots = backend_slots(route)
    _missing(where, slots, services)
    found: dict[str, set[int]] = {}
    for slot in slots:
        found.setdefault(slot.service, set()).add(slot.weight)
    return {service: next(iter(found[service])) if len(found[service]) == 1 else None for service in services}


def weights_patch(where: str, route: Mapping[str, Any], weights: Mapping[str, int]) -> list[dict[str, Any]]:
    """The JSON patch that gives the route ``weights`` (empty when it has them already): for each
    backendRef whose weight differs, a ``test`` that it still names its Service, then the weight."""
    bad = {s: w for s, w in weights.items() if not 0 <= w <= MAX_WEIGHT}
    if bad:
        raise ValueError(f"backend weights must be in [0, {MAX_WEIGHT}]: {bad}")
    slots = backend_slots(route)
    _missing(where, slots, weights)
    ops: list[dict[str, Any]] = []
    for slot in slots:
        if slot.service in weights and slot.weight != weights[slot.service]:
            ops.append({"op": "test", "path": f"{slot.path}/name", "value": slot.service})
            ops.append({"op": "add", "path": f"{slot.path}/weight", "value": weights[slot.service]})
    return ops


def _unprocessable(err: Rejected) -> bool:
    """A 422: what the apiserver answers to a failed ``test`` -- and to a patch that is invalid."""
    cause = err.__cause__
    return isinstance(cause, ApiException) and cause.status == 422


def _tests_hold(route: Mapping[str, Any], ops: list[dict[str, Any]]) -> bool:
    """Do the patch's ``test`` operations hold on ``route``? (Tells a route that moved under the
    patch from a patch the apiserver found invalid: it gives both the same answer.)"""
    for op in ops:
        if op["op"] != "test":
            continue
        node: Any = route
        for part in op["path"].strip("/").split("/"):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                return False
        if node != op["value"]:
            return False
    return True


class HTTPRouteRouter:
    def __init__(self, kube: KubeClients) -> None:
        self._custom = kube.custom

    def _read(self, namespace: str, route: str) -> dict[str, Any]:
        where = f"HTTPRoute {namespace}/{route}"
        try:
            with kube_errors(f"reading {where}"):
                got = self._custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, route)
        except NotFound as exc:
            raise RouteNotFound(
                f"{where} not found (is it in the ModelBudget's namespace, and are the Gateway API CRDs installed?)"
            ) from exc
        return cast(dict[str, Any], got)  # a custom object is its JSON, as a dict

    def weights(self, namespace: str, route: str, services: Collection[str]) -> dict[str, int | None]:
        return weights_in_force(f"HTTPRoute {namespace}/{route}", self._read(namespace, route), services)

    def publish(self, namespace: str, route: str, weights: Mapping[str, int]) -> bool:
        where = f"HTTPRoute {namespace}/{route}"
        current = self._read(namespace, route)
        for _ in range(PATCH_ATTEMPTS):
            ops = weights_patch(where, current, weights)
            if not ops:
                return False
            try:
                with kube_errors(f"setting backend weights on {where}"):
                    self._custom.patch_namespaced_custom_object(
                        GROUP, VERSION, namespace, PLURAL, route, ops, _content_type=JSON_PATCH
                    )
                return True
            except NotFound as exc:
                raise RouteNotFound(f"{where} was deleted while its weights were set") from exc
            except Rejected as exc:
                if not _unprocessable(exc):
                    raise
                current = self._read(namespace, route)
                if _tests_hold(current, ops):  # the route is where it was: the patch itself was refused
                    raise
        raise Conflict(f"{where}: its backendRefs kept changing while the weights were set; the next reconcile retries")
