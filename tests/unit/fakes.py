"""In-memory fakes of the adapter Protocols: they hold a cluster's worth of state and record calls."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from modelbudget.adapters.capacitybuffer import Buffer, Owner
from modelbudget.adapters.errors import NotFound, Rejected, Unavailable
from modelbudget.adapters.gpupools import DeclaredPool
from modelbudget.adapters.lease import LeaseRecord
from modelbudget.adapters.metrics import PrometheusCredentials
from modelbudget.adapters.nodepools import node_selector
from modelbudget.adapters.routing import BackendNotInRoute, RouteNotFound
from modelbudget.adapters.scaler import ScaleState
from modelbudget.adapters.secrets import SecretMissing
from modelbudget.adapters.tokenlimit import Published
from modelbudget.api.spec import Metrics, NodePool, OpenCostQueries, ProviderRef, TokenLimitPublish
from modelbudget.controller.reconciler import Adapters, Reconciler
from modelbudget.core.observation import DemandSample, GateReport
from modelbudget.core.prices import NodePrice


@dataclass
class FakeMetrics:
    next: DemandSample = field(default_factory=DemandSample)
    calls: list[tuple[str, PrometheusCredentials]] = field(default_factory=list)
    gates: Callable[[], GateReport] | None = None  # what the gates report, when it is not in ``next``

    async def sample(
        self, metrics: Metrics, namespace: str, target: str, credentials: PrometheusCredentials
    ) -> DemandSample:
        self.calls.append((namespace, credentials))
        if self.gates is None or self.next.at is None:
            return self.next
        return replace(self.next, gates=self.gates())


@dataclass
class FakeSecrets:
    data: dict[tuple[str, str, str], str] = field(default_factory=dict)
    reads: list[tuple[str, str, str]] = field(default_factory=list)

    def read(self, namespace: str, name: str, key: str) -> str:
        self.reads.append((namespace, name, key))
        try:
            return self.data[namespace, name, key]
        except KeyError:
            raise SecretMissing(f"Secret {namespace}/{name} has no key {key!r}") from None


@dataclass
class FakeScaler:
    replicas: int = 1
    ready: int = 1
    exists: bool = True
    sets: list[int] = field(default_factory=list)

    def get(self, namespace: str, name: str) -> ScaleState:
        if not self.exists:
            raise NotFound(f"Deployment {namespace}/{name}: HTTP 404 Not Found")
        return ScaleState(self.replicas, self.ready)

    def set_replicas(self, namespace: str, name: str, replicas: int) -> None:
        self.sets.append(replicas)
        self.replicas = replicas


@dataclass
class FakeNodePools:
    nodes: dict[str, int] = field(default_factory=dict)  # running, by pool name
    sizes: dict[str, int] = field(default_factory=dict)  # what the provider object says
    resizes: list[tuple[str, int]] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)  # provider objects read, by pool name
    fail_resize: bool = False

    def count_nodes(self, selector: dict[str, str]) -> int:
        return next((n for pool, n in self.nodes.items() if node_selector_for(pool) == selector), 0)

    def node_names(self, selector: dict[str, str]) -> list[str]:
        pool = next((p for p in self.nodes if node_selector_for(p) == selector), None)
        return [] if pool is None else fake_node_names(pool, self.nodes[pool])

    def sized_to(self, pool: NodePool, namespace: str) -> int | None:
        self.reads.append(pool.name)
        return self.sizes.get(pool.name)

    def resize(self, pool: NodePool, namespace: str, nodes: int) -> None:
        if self.fail_resize:
            raise Rejected(f"resizing node pool {pool.name}: HTTP 403 Forbidden")
        self.resizes.append((pool.name, nodes))
        self.sizes[pool.name] = nodes

    # A shared pool's provider object, recorded by its name.
    def provider_sized_to(self, ref: ProviderRef, gpus_per_node: int, namespace: str) -> int | None:
        self.reads.append(ref.name)
        return self.sizes.get(ref.name)

    def resize_provider(self, ref: ProviderRef, gpus_per_node: int, namespace: str, nodes: int) -> None:
        if self.fail_resize:
            raise Rejected(f"resizing {ref.kind.value} {ref.name}: HTTP 403 Forbidden")
        self.resizes.append((ref.name, nodes))
        self.sizes[ref.name] = nodes


@dataclass
class FakeGpuPools:
    """GpuPools and namespace labels as the apiserver would list them; records the reads."""

    pools: dict[str, DeclaredPool] = field(default_factory=dict)
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    listed: int = 0

    def declared(self) -> dict[str, DeclaredPool]:
        self.listed += 1
        return dict(self.pools)

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        return dict(self.labels.get(namespace, {}))


def fake_node_names(pool: str, count: int) -> list[str]:
    return [f"{pool}-node-{i}" for i in range(count)]


@dataclass
class FakePrices:
    """OpenCost as the operator sees it: a price per node name, or an outage."""

    prices: dict[str, NodePrice] = field(default_factory=dict)
    error: str | None = None
    calls: list[OpenCostQueries] = field(default_factory=list)

    def node_prices(
        self, metrics: Metrics, queries: OpenCostQueries, credentials: PrometheusCredentials
    ) -> dict[str, NodePrice]:
        self.calls.append(queries)
        if self.error is not None:
            raise Unavailable(self.error)
        return dict(self.prices)


def node_selector_for(pool_name: str) -> dict[str, str]:
    return node_selector(
        NodePool.model_validate(
            {
                "name": pool_name,
                "gpuType": "x",
                "pricePerGpuHour": 1,
                "gpusPerNode": 1,
                "maxNodes": 1,
                "tokensPerSecondPerReplica": 1,
            }
        )
    )


@dataclass
class FakeTokenLimits:
    limit: int | None = None
    admitted_rps_per_pod: float | None = None
    published: list[int | None] = field(default_factory=list)
    variant_weights: Mapping[str, int] | None = None

    def read(self, namespace: str, target: str, publish: TokenLimitPublish) -> Published:
        return Published(self.limit, self.admitted_rps_per_pod, self.variant_weights)

    def publish(self, namespace: str, target: str, publish: TokenLimitPublish, values: Published) -> None:
        self.published.append(values.token_limit)
        self.limit, self.admitted_rps_per_pod = values.token_limit, values.admitted_rps_per_pod
        self.variant_weights = values.variant_weights


GATE_DEFAULT_LIMIT = 8192  # what a gate applies before anything is published (its --default-max-tokens)


@dataclass
class FakeConflicts:
    found: list[str] = field(default_factory=list)

    def find(self, namespace: str, deployment: str) -> list[str]:
        return list(self.found)


@dataclass
class FakeTrafficRouter:
    """HTTPRoutes as (namespace, route) -> {backend Service: weight}; records every write."""

    routes: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    writes: list[tuple[str, str, dict[str, int]]] = field(default_factory=list)

    def _route(self, namespace: str, route: str, services: Collection[str]) -> dict[str, int]:
        if (namespace, route) not in self.routes:
            raise RouteNotFound(f"HTTPRoute {namespace}/{route} not found")
        backends = self.routes[namespace, route]
        if missing := set(services) - set(backends):
            raise BackendNotInRoute(f"HTTPRoute {namespace}/{route}", missing)
        return backends

    def weights(self, namespace: str, route: str, services: Collection[str]) -> dict[str, int | None]:
        backends = self._route(namespace, route, services)
        return {s: backends[s] for s in services}

    def publish(self, namespace: str, route: str, weights: Mapping[str, int]) -> bool:
        backends = self._route(namespace, route, weights)
        if all(backends[s] == w for s, w in weights.items()):
            return False
        backends.update(weights)
        self.writes.append((namespace, route, dict(weights)))
        return True


@dataclass
class FakeCapacityBuffers:
    """CapacityBuffers as (namespace, name) -> the buffer and its owner; ``foreign`` ones exist and
    are not the operator's.  Records every write."""

    api_served: bool = True
    buffers: dict[tuple[str, str], tuple[Buffer, Owner]] = field(default_factory=dict)
    foreign: set[tuple[str, str]] = field(default_factory=set)
    writes: list[tuple[str, str, Buffer]] = field(default_factory=list)

    def served(self) -> bool:
        return self.api_served

    def read(self, namespace: str, name: str) -> Buffer | None:
        found = self.buffers.get((namespace, name))
        return None if found is None else found[0]

    def _check(self, namespace: str, name: str) -> None:
        if not self.api_served:
            raise NotFound(f"creating CapacityBuffer {namespace}/{name}: HTTP 404 Not Found")
        if (namespace, name) in self.foreign:
            raise Rejected(f"CapacityBuffer {namespace}/{name} exists and is not managed by modelbudget")

    def apply(self, namespace: str, name: str, owner: Owner, wanted: Buffer) -> bool:
        self._check(namespace, name)
        if self.buffers.get((namespace, name)) == (wanted, owner):
            return False
        self.buffers[namespace, name] = (wanted, owner)
        self.writes.append((namespace, name, wanted))
        return True


@dataclass
class FakeCluster:
    """All fakes together, with the ``Adapters`` bundle the reconciler takes."""

    metrics: FakeMetrics = field(default_factory=FakeMetrics)
    secrets: FakeSecrets = field(default_factory=FakeSecrets)
    scaler: FakeScaler = field(default_factory=FakeScaler)
    pools: FakeNodePools = field(default_factory=FakeNodePools)
    gpu_pools: FakeGpuPools = field(default_factory=FakeGpuPools)
    tokens: FakeTokenLimits = field(default_factory=FakeTokenLimits)
    conflicts: FakeConflicts = field(default_factory=FakeConflicts)
    prices: FakePrices = field(default_factory=FakePrices)
    buffers: FakeCapacityBuffers = field(default_factory=lambda: FakeCapacityBuffers(api_served=False))
    gates_running: bool = True  # gates in every pod, applying what is published

    def __post_init__(self) -> None:
        self.metrics.gates = self._gate_report

    def _gate_report(self) -> GateReport:
        if not self.gates_running:
            return GateReport()
        return GateReport((float(self.tokens.limit or GATE_DEFAULT_LIMIT),))

    @property
    def adapters(self) -> Adapters:
        return Adapters(
            metrics=self.metrics,
            secrets=self.secrets,
            scaler=self.scaler,
            node_pools=self.pools,
            gpu_pools=self.gpu_pools,
            token_limits=self.tokens,
            conflicts=self.conflicts,
            prices=self.prices,
            capacity_buffers=self.buffers,
        )

    def writes(self) -> int:
        return len(self.scaler.sets) + len(self.pools.resizes) + len(self.tokens.published) + len(self.buffers.writes)


@dataclass
class FakeLeaseStore:
    record: LeaseRecord | None = None
    version: int = 0
    reachable: bool = True

    def get(self) -> LeaseRecord | None:
        if not self.reachable:
            raise ConnectionError("apiserver down")
        return self.record

    def create(self, record: LeaseRecord) -> bool:
        if self.record is not None:
            return False
        return self._store(record)

    def update(self, record: LeaseRecord) -> bool:
        if not self.reachable or self.record is None or record.resource_version != self.record.resource_version:
            return False
        return self._store(record)

    def _store(self, record: LeaseRecord) -> bool:
        self.version += 1
        self.record = LeaseRecord(
            record.holder,
            record.duration_seconds,
            record.acquired_at,
            record.renewed_at,
            record.transitions,
            str(self.version),
        )
        return True


@dataclass
class Clock:
    """A monotonic clock tests move by hand."""

    t: float = 1000.0

    def __call__(self) -> float:
        return self.t


def demand(at: datetime, rps: float, generated: float = 400.0, waiting: float = 0.0) -> DemandSample:
    """A sample as a source without FakeCluster's gates sees it: one gate at its default limit."""
    return DemandSample(
        at=at,
        request_rate=rps,
        generated_tokens_per_request=generated,
        prompt_tokens_per_request=200.0,
        requests_waiting=waiting,
        gates=GateReport((float(GATE_DEFAULT_LIMIT),)),
    )


def as_the_apiserver_stores_it(value: Any) -> Any:
    """Go's JSON encoding writes whole floats without a fraction: 8.0 comes back as 8."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: as_the_apiserver_stores_it(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_the_apiserver_stores_it(v) for v in value]
    return value


def example_reconciler(adapters: Adapters) -> Reconciler:
    """A reconciler for examples/local-demo.yaml: the testbed has one tenant, so its inline
    KwokNodePool is allowed (core/tenancy.py; the operator's --inline-cluster-pools=allow)."""
    return Reconciler(adapters, inline_cluster_pools=True)
