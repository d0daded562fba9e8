"""One reconcile of one ModelBudget: parse -> observe -> decide -> act -> status. No kopf here.

The adapters are synchronous clients; every call runs in a thread (``asyncio.to_thread``;
Prometheus queries on a pool of their own) so a slow apiserver or Prometheus never blocks the
event loop (other ModelBudgets, leases, probes).
Everything is level-triggered: the plan comes from what is observed now plus the controller
state, never from what changed in the spec.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pydantic import ValidationError

from modelbudget.adapters.capacitybuffer import Buffer, CapacityBuffers, Owner
from modelbudget.adapters.conflicts import ConflictFinder
from modelbudget.adapters.errors import AdapterError, NotFound
from modelbudget.adapters.gpupools import DeclaredPool, GpuPools
from modelbudget.adapters.metrics import MAX_PARALLEL_QUERIES, MetricsSource, PrometheusCredentials
from modelbudget.adapters.nodepools import NodePools, node_selector
from modelbudget.adapters.prices import NodePriceSource
from modelbudget.adapters.scaler import Scaler, ScaleState
from modelbudget.adapters.secrets import SecretMissing, SecretSource, prometheus_credentials
from modelbudget.adapters.tokenlimit import Published, TokenLimitSink, config_map_name
from modelbudget.api.reasons import Reason
from modelbudget.api.spec import Metrics, Mode, ModelBudgetSpec, NodePool, PriceSource
from modelbudget.api.status import ControllerState, Knob, ModelBudgetStatus, Plan
from modelbudget.controller import status as st
from modelbudget.core import Decision, Observation, ResolvedSpec, decide, resolve
from modelbudget.core.curve import CurveFitError
from modelbudget.core.observation import DemandSample
from modelbudget.core.pools import PoolView, claims_of, pool_view, with_views
from modelbudget.core.prices import NodePrice, ObservedPrices
from modelbudget.core.tenancy import pools_not_allowed

T = TypeVar("T")
DEFAULT_HEARTBEAT = timedelta(seconds=60)
# OpenCost's price queries get threads of their own (demand metrics are awaited without one).
# asyncio's default executor has cpu+4 threads (6 on two cores); a hung Prometheus holds one per
# ModelBudget for up to metrics.timeoutSeconds, and on the shared executor a handful of such
# ModelBudgets would stall every apiserver call (and the leader's lease renewals) of all the others.
PRICE_THREADS = MAX_PARALLEL_QUERIES


@dataclass(frozen=True)
class Adapters:
    metrics: MetricsSource
    secrets: SecretSource
    scaler: Scaler
    node_pools: NodePools
    gpu_pools: GpuPools
    token_limits: TokenLimitSink
    conflicts: ConflictFinder
    prices: NodePriceSource
    capacity_buffers: CapacityBuffers


@dataclass(frozen=True)
class ObjectRef:
    namespace: str
    name: str
    generation: int | None = None
    uid: str = ""  # the ModelBudget's, for the ownerReference of what it creates


@dataclass(frozen=True)
class Reconciled:
    """What one reconcile of a valid spec saw, decided and did."""

    resolved: ResolvedSpec
    observation: Observation
    decision: Decision
    actions: list[st.KnobChange]


@dataclass(frozen=True)
class Outcome:
    status: ModelBudgetStatus  # as this reconcile sees it
    status_patch: dict[str, Any] | None  # merge patch for .status; None: nothing worth writing
    events: list[st.EventNote]
    problems: list[Reason]  # what went wrong this tick, for the operator's metrics
    reconciled: Reconciled | None = None  # None: refused (invalid spec, pool not allowed), nothing observed or done

    @property
    def actions(self) -> list[st.KnobChange]:
        return self.reconciled.actions if self.reconciled is not None else []


@dataclass(frozen=True)
class Cluster:
    """What the apiserver says about the target: the cluster half of the observation."""

    scale: ScaleState | None  # None: the Deployment does not exist
    nodes: dict[str, int]
    pool_sizes: dict[str, int | None]  # what each provider object is set to now
    published: Published
    conflicts: list[str]
    node_names: dict[str, tuple[str, ...]] | None = None  # by pool; listed only to look up prices
    buffers_served: bool = False  # the cluster serves CapacityBuffers
    buffer: Buffer | None = None  # the ModelBudget's CapacityBuffer as it is now


def _failure(action: st.KnobChange, exc: Exception) -> str:
    if isinstance(exc, AdapterError):
        return str(exc)  # names the object and the HTTP status; safe to show
    return f"{action.knob.value} {action.target}: {type(exc).__name__}"


def parse_spec(raw: Mapping[str, Any]) -> ResolvedSpec | str:
    """The spec with its curve resolved, or a message saying what is wrong with it."""
    try:
        spec = ModelBudgetSpec.model_validate(dict(raw))
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors()]
        return "; ".join(problems)[:1000]
    try:
        return resolve(spec)
    except CurveFitError as exc:
        return f"curve.samples: {exc}"


def previous_status(raw: Mapping[str, Any]) -> tuple[ModelBudgetStatus, dict[str, Any]]:
    """The stored status, and the document the next write is computed against.

    One that no longer parses is started afresh rather than trusted, and diffed as if empty so
    the next write replaces every section of it -- keeping its controller state (the spend
    ledger, the windows) when that part still parses on its own.
    """
    try:
        return ModelBudgetStatus.model_validate(dict(raw)), dict(raw)
    except ValidationError:
        pass
    try:
        kept = ControllerState.model_validate(raw.get("controllerState") or {})
    except ValidationError:
        kept = ControllerState()
    return ModelBudgetStatus(controller_state=kept), {}


class Reconciler:
    def __init__(
        self, adapters: Adapters, heartbeat: timedelta = DEFAULT_HEARTBEAT, inline_cluster_pools: bool = False
    ) -> None:
        self.adapters = adapters
        self.heartbeat = heartbeat
        self.inline_cluster_pools = inline_cluster_pools  # core/tenancy.py: single-tenant clusters only
        self._price_threads = ThreadPoolExecutor(PRICE_THREADS, thread_name_prefix="prices")

    @staticmethod
    async def _call(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def reconcile(
        self,
        ref: ObjectRef,
        raw_spec: Mapping[str, Any],
        raw_status: Mapping[str, Any],
        carried: ControllerState | None,
        now: datetime,
    ) -> Outcome:
        before, old_doc = previous_status(raw_status)
        parsed = parse_spec(raw_spec)
        if isinstance(parsed, str):
            return self._refused(before, old_doc, Reason.INVALID_SPEC, parsed, ref, now)
        own_spec = parsed.spec
        # Before anything is read or written on this ModelBudget's behalf: may it use its pools?
        declared, labels = await self._gpu_pools(own_spec, ref.namespace)
        gpu_pools = {n: d.spec for n, d in declared.items()}
        not_allowed = pools_not_allowed(own_spec, ref.namespace, labels, gpu_pools, self.inline_cluster_pools)
        if not_allowed:
            return self._refused(before, old_doc, Reason.POOL_NOT_ALLOWED, "; ".join(not_allowed), ref, now)
        state = carried if carried is not None else before.controller_state
        # The planner sees each shared pool as this ModelBudget's granted view of it (core/pools.py).
        per_replica = own_spec.replicas.gpus_per_replica
        views = {
            s.pool: pool_view(s, declared[s.pool].spec, declared[s.pool].status, ref.namespace, ref.name, per_replica)
            for s in own_spec.shared_pools
        }
        resolved = resolve(with_views(own_spec, list(views.values()))) if views else parsed
        spec = resolved.spec

        # Read once for both the demand and the prices' queries; each says in its own terms when
        # the Secret cannot be read.
        creds = await self._credentials(spec.metrics, ref.namespace)
        cluster, sample, prices = await asyncio.gather(
            self._observe_cluster(own_spec, ref),
            self._sample(spec, ref.namespace, creds),
            self._node_prices(own_spec, ref.namespace, creds),
        )
        obs = _observation(cluster, sample, views, prices)
        decision = decide(obs, resolved, state, now)

        actions: list[st.KnobChange] = []
        failures: list[str] = []
        acting = spec.mode is Mode.ENFORCE and not cluster.conflicts and cluster.scale is not None
        if acting:
            actions, failures = await self._act(spec, ref, decision, cluster)

        facts = st.Facts(
            spec=spec,
            observation=obs,
            decision=decision,
            # Recommend mode next to an HPA is a shadow run, not a conflict: it changes nothing.
            conflicts=cluster.conflicts if spec.mode is Mode.ENFORCE else [],
            target_missing=None if cluster.scale else f"Deployment {ref.namespace}/{spec.target_ref.name} not found",
            failures=failures,
        )
        new = st.build_status(before, facts, ref.generation, now)
        # Only a ModelBudget that acts claims shared capacity; one that does not releases its grants.
        claims = claims_of(decision.plan, spec.shared_pools, spec.replicas.gpus_per_replica) if acting else []
        new = new.model_copy(update={"pool_claims": claims})
        return Outcome(
            status=new,
            status_patch=st.status_patch(old_doc, new, now, self.heartbeat),
            events=st.events_for(before.conditions, new.conditions, actions),
            problems=st.problems(facts),
            reconciled=Reconciled(resolved, obs, decision, actions),
        )

    def _refused(
        self,
        before: ModelBudgetStatus,
        old_doc: Mapping[str, Any],
        reason: Reason,
        message: str,
        ref: ObjectRef,
        now: datetime,
    ) -> Outcome:
        """The outcome for a ModelBudget the operator will not act on: nothing observed or done."""
        # A refused ModelBudget acts on nothing, so it claims nothing of any shared pool.
        refused = st.refused_status(before, reason, message, ref.generation, now).model_copy(update={"pool_claims": []})
        return Outcome(
            status=refused,
            status_patch=st.status_patch(old_doc, refused, now, self.heartbeat),
            events=st.events_for(before.conditions, refused.conditions, []),
            problems=[reason],
        )

    async def _gpu_pools(self, spec: ModelBudgetSpec, namespace: str) -> tuple[dict[str, DeclaredPool], dict[str, str]]:
        """The GpuPools declared and the namespace's labels, read only when the spec names a pool
        provider or a shared pool (an inline provider must not be one a GpuPool declares)."""
        inline_providers = any(p.provider_ref is not None for p in spec.node_pools)
        if not inline_providers and not spec.shared_pools:
            return {}, {}
        a = self.adapters
        declared = await self._call(a.gpu_pools.declared)
        labels = await self._call(a.gpu_pools.namespace_labels, namespace) if spec.shared_pools else {}
        return declared, labels

    async def _observe_cluster(self, spec: ModelBudgetSpec, ref: ObjectRef) -> Cluster:
        """Everything the reconcile reads from the cluster, in one trip to a thread. In the steady
        state each read is a watch-cache lookup of microseconds; at N = 1000 a trip per read (seven
        a reconcile, each thread then waiting for the GIL behind the busy event loop) was most of
        a slow reconcile's time."""
        return await self._call(self._read_cluster, spec, ref)

    def _read_cluster(self, spec: ModelBudgetSpec, ref: ObjectRef) -> Cluster:
        a, target, namespace = self.adapters, spec.target_ref.name, ref.namespace
        pools = spec.node_pools
        try:
            scale: ScaleState | None = a.scaler.get(namespace, target)
        except NotFound:
            scale = None
        by_name = spec.spend.source is PriceSource.OPEN_COST
        found = [self._pool_nodes(p, by_name) for p in pools]
        served, buffer = self._buffer(ref)
        return Cluster(
            scale=scale,
            nodes={p.name: count for p, (count, _) in zip(pools, found, strict=True)},
            pool_sizes={p.name: self._sized_to(p, namespace) for p in pools},
            published=a.token_limits.read(namespace, target, spec.token_limits.publish),
            conflicts=a.conflicts.find(namespace, target),
            node_names={p.name: names for p, (_, names) in zip(pools, found, strict=True)} if by_name else None,
            buffers_served=served,
            buffer=buffer,
        )

    def _buffer(self, ref: ObjectRef) -> tuple[bool, Buffer | None]:
        """Whether the cluster serves CapacityBuffers, and the ModelBudget's as it is now.  An API
        that cannot be asked counts as not served: headroom then goes where it goes without one,
        and no buffer is written."""
        buffers = self.adapters.capacity_buffers
        try:
            if not buffers.served():
                return False, None
            return True, buffers.read(ref.namespace, ref.name)
        except AdapterError:
            return False, None

    def _pool_nodes(self, pool: NodePool, by_name: bool) -> tuple[int, tuple[str, ...]]:
        """How many Nodes the pool runs; with OpenCost prices also their names (one list call either
        way), to price each."""
        selector = node_selector(pool)
        if not by_name:
            return self.adapters.node_pools.count_nodes(selector), ()
        names = tuple(self.adapters.node_pools.node_names(selector))
        return len(names), names

    def _sized_to(self, pool: NodePool, namespace: str) -> int | None:
        if pool.provider_ref is None:
            return None
        try:
            return self.adapters.node_pools.sized_to(pool, namespace)
        except AdapterError:
            return None  # a missing provider object is reported when resizing it fails

    async def _credentials(self, metrics: Metrics, namespace: str) -> PrometheusCredentials | Exception:
        """The Prometheus credentials, or why they could not be read (for each reader to report);
        a trip to a thread only when a Secret must be read."""
        if metrics.auth is None and metrics.ca_secret_ref is None:
            return PrometheusCredentials()
        try:
            return await self._call(prometheus_credentials, self.adapters.secrets, metrics, namespace)
        except Exception as exc:
            return exc

    async def _sample(
        self, spec: ModelBudgetSpec, namespace: str, creds: PrometheusCredentials | Exception
    ) -> DemandSample:
        """Demand metrics, never an exception: every failure is an explicit unknown."""
        try:
            if isinstance(creds, Exception):
                raise creds
            return await self.adapters.metrics.sample(spec.metrics, namespace, spec.target_ref.name, creds)
        except SecretMissing as exc:
            return DemandSample(error=f"credentials: {exc}")
        except Exception as exc:  # a bug or an unforeseen answer must not stop the reconcile
            return DemandSample(error=f"metrics source failed: {type(exc).__name__}")

    async def _node_prices(
        self, spec: ModelBudgetSpec, namespace: str, creds: PrometheusCredentials | Exception
    ) -> dict[str, NodePrice] | str | None:
        """OpenCost's node prices (``spend.source: OpenCost`` only, else None), or why they could
        not be read; never an exception."""
        if spec.spend.source is not PriceSource.OPEN_COST:
            return None
        try:
            if isinstance(creds, Exception):
                raise creds
            return await asyncio.get_running_loop().run_in_executor(
                self._price_threads, self.adapters.prices.node_prices, spec.metrics, spec.spend.queries, creds
            )
        except (SecretMissing, AdapterError) as exc:
            return str(exc)
        except Exception as exc:  # a bug or an unforeseen answer must not stop the reconcile
            return f"price source failed: {type(exc).__name__}"

    async def _act(
        self,
        spec: ModelBudgetSpec,
        ref: ObjectRef,
        decision: Decision,
        cluster: Cluster,
    ) -> tuple[list[st.KnobChange], list[str]]:
        """Apply the plan, fast knob first when it tightens: a lower limit takes effect in seconds,
        while fewer replicas or nodes take a while; a higher limit waits for the capacity.  The
        CapacityBuffer moves between the nodes growing and shrinking: its placeholder pods find
        the room the pool was given, and are gone before the pool shrinks."""
        a, target, plan, namespace = self.adapters, spec.target_ref.name, decision.plan, ref.namespace
        assert cluster.scale is not None
        actions: list[st.KnobChange] = []
        failures: list[str] = []

        async def attempt(changes: list[st.KnobChange], fn: Callable[..., bool | None], *args: Any) -> None:
            try:
                if await self._call(fn, *args) is not False:  # False: there was nothing to write
                    actions.extend(changes)
            except Exception as exc:  # one knob failing must not keep the others from moving
                failures.append(_failure(changes[0], exc))

        publish = spec.token_limits.publish
        before, wanted = cluster.published, fast_knobs(plan, cluster.scale.ready_replicas)
        where = config_map_name(publish, target)
        fast_changes = [
            st.KnobChange(knob, where, was, now)
            for knob, was, now in (
                (Knob.TOKEN_LIMIT, before.token_limit, wanted.token_limit),
                (Knob.ADMITTED_RATE, before.admitted_rps_per_pod, wanted.admitted_rps_per_pod),
            )
            if was != now
        ]
        tightening = _tightens(before, wanted)
        if fast_changes and tightening:
            await attempt(fast_changes, a.token_limits.publish, namespace, target, publish, wanted)

        wanted_nodes = plan.nodes_by_pool()
        resizes = [
            (p, cluster.pool_sizes[p.name], wanted_nodes[p.name])
            for p in spec.node_pools
            if p.provider_ref is not None and cluster.pool_sizes[p.name] != wanted_nodes[p.name]
        ]
        growing = [r for r in resizes if r[1] is None or r[2] > r[1]]
        shrinking = [r for r in resizes if r not in growing]
        for pool, size, nodes in growing:
            await attempt(
                [st.KnobChange(Knob.NODES, pool.name, size, nodes)], a.node_pools.resize, pool, namespace, nodes
            )
        # The buffer carries the plan's placeholder pods: 0 on stale metrics, and 0 where headroom
        # no longer goes to it (headroom: Replicas, the forecast off).  A buffer at 0 is kept, not
        # deleted (it comes back with the forecast; the ModelBudget's deletion takes it, as its
        # owner); none is created for 0.
        if cluster.buffers_served:
            current, buffer = cluster.buffer, Buffer(target=target, replicas=plan.buffer_replicas)
            if current != buffer and (current is not None or buffer.replicas):
                change = st.KnobChange(
                    Knob.CAPACITY_BUFFER, ref.name, None if current is None else current.replicas, buffer.replicas
                )
                owner = Owner(ref.name, ref.uid)
                await attempt([change], a.capacity_buffers.apply, namespace, ref.name, owner, buffer)
        if plan.replicas != cluster.scale.replicas:
            await attempt(
                [st.KnobChange(Knob.REPLICAS, target, cluster.scale.replicas, plan.replicas)],
                a.scaler.set_replicas,
                namespace,
                target,
                plan.replicas,
            )
        for pool, size, nodes in shrinking:
            await attempt(
                [st.KnobChange(Knob.NODES, pool.name, size, nodes)], a.node_pools.resize, pool, namespace, nodes
            )
        if fast_changes and not tightening:
            await attempt(fast_changes, a.token_limits.publish, namespace, target, publish, wanted)
        return actions, failures


def fast_knobs(plan: Plan, ready_replicas: int) -> Published:
    """What the gates should apply: the limit, and each ready pod's share of the admitted rate
    (3 significant digits, so that noise in the plan does not rewrite the ConfigMap)."""
    admitted = plan.admitted_requests_per_second
    share = None if admitted is None else float(f"{admitted / max(ready_replicas, 1):.3g}")
    return Published(plan.token_limit, share)


def _tightens(before: Published, wanted: Published) -> bool:
    """A lower limit or a lower (or new) admission cap: it goes out before the slow knobs move."""
    lower_limit = before.token_limit is None or (wanted.token_limit or 0) < before.token_limit
    was, now = before.admitted_rps_per_pod, wanted.admitted_rps_per_pod
    lower_cap = now is not None and (was is None or now < was)
    return lower_limit or lower_cap


def _observation(
    cluster: Cluster,
    sample: DemandSample,
    views: Mapping[str, PoolView],
    prices: dict[str, NodePrice] | str | None,
) -> Observation:
    """What was seen; on a shared pool, what this ModelBudget holds is its grant (its share of the bill)."""
    scale = cluster.scale or ScaleState(replicas=0, ready_replicas=0)
    observed = None
    if isinstance(prices, str):
        observed = ObservedPrices(error=prices)
    elif prices is not None and cluster.node_names is not None:
        observed = ObservedPrices(pool_nodes=cluster.node_names, node_prices=prices)
    return Observation(
        current_replicas=scale.replicas,
        ready_replicas=scale.ready_replicas,
        current_nodes={**cluster.nodes, **{name: v.granted_replicas for name, v in views.items()}},
        current_token_limit=cluster.published.token_limit,
        demand=sample,
        prices=observed,
        capacity_buffers=cluster.buffers_served,
    )
