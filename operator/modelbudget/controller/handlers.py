"""The kopf layer, kept thin: a timer per ModelBudget hands the object to the ``Reconciler`` and
turns its outcome into a status patch, Events and metrics.

State between ticks: the ``ControllerState`` the last tick produced is carried in the object's
kopf memo (ticks where nothing worth writing changed do not persist it), tagged with the
leadership term it was computed under; after a restart or a change of leader it comes from
``status.controllerState`` instead, which is what makes a restart lose no spend ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf

from modelbudget.adapters.claims import PoolClaims
from modelbudget.adapters.errors import Unavailable
from modelbudget.api.pool import POOL_PLURAL
from modelbudget.api.spec import GROUP, PLURAL, VERSION
from modelbudget.controller import memory, telemetry
from modelbudget.controller.leader import LeaderElector
from modelbudget.controller.pools import PoolReconciler
from modelbudget.controller.reconciler import ObjectRef, Reconciler
from modelbudget.controller.spread import Shard, phase
from modelbudget.controller.status import Written, ahead_of_watch, status_document, status_seen

FINALIZER = "modelbudget.dev/finalizer"
# kopf's own HTTP session opens a connection for every request in flight, without bound, and each
# TLS connection holds a 256 KiB buffer (asyncio's sslproto): at 1,000 ModelBudgets the first round
# of status patches and Events had about 2,000 open at once, 250 MiB that the allocator kept after
# they closed.  A bounded pool queues the excess instead (and reuses connections, so fewer TLS
# handshakes).  Each watch stream holds a connection for minutes, so the bound is on top of them.
# 16: with 64, 16.5 MiB of those buffers were live at N = 1,000 (tracemalloc, bench/scale.py), and
# in the steady state the operator writes nothing; a start's first round of writes queues longer.
API_CONNECTIONS = 16
EVENT_SOURCE = "modelbudget-operator"  # Events' "From" column: the operator, not the framework


@dataclass
class Runtime:
    """What every handler shares: built once at startup by ``modelbudget run``."""

    reconciler: Reconciler
    elector: LeaderElector | None  # None: leader election disabled (one replica, development)
    identity: str  # this process, as the Lease and the Events' reporting instance name it
    pools: PoolReconciler
    claims: PoolClaims  # the ModelBudgets' claims on shared pools, which a pool's writer sums
    shard: Shard = field(default_factory=Shard)  # the ModelBudgets and GpuPools this process's shard acts on

    def leading(self) -> bool:
        return self.elector is None or self.elector.is_leader

    def owns(self, namespace: str, name: str) -> bool:
        """Whether ModelBudget ``namespace/name`` is this shard's: kopf runs the reconcile timer
        only for those."""
        return self.shard.owns_model_budget(namespace, name)

    def owns_pool(self, name: str) -> bool:
        """Whether this process is the one writer of GpuPool ``name``: the leader of the shard
        the pool hashes to."""
        return self.shard.owns_pool(name) and self.leading()

    @property
    def term(self) -> int:
        return 0 if self.elector is None else self.elector.term


def bounded_session(info: kopf.ConnectionInfo, connections: int) -> kopf.AiohttpSession:
    """kopf's session for ``info`` (as kopf builds it), with at most ``connections`` open."""
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(),
        proxy=info.proxy_url,
        trust_env=info.trust_env,
    )
    return kopf.AiohttpSession(
        server=info.server,
        default_namespace=info.default_namespace,
        priority=info.priority,
        expiration=info.expiration,
        aiohttp_session=session,  # kopf closes it when the credentials are replaced
    )


def register(registry: kopf.OperatorRegistry, runtime: Runtime, interval: float, watch_streams: int = 2) -> None:
    """``watch_streams``: how many watches kopf keeps open (one per watched namespace and kind),
    each holding one of the session's connections."""

    @kopf.on.login(id="login", registry=registry)
    async def login(**kwargs: Any) -> kopf.AiohttpSession | None:
        # kopf talks to the apiserver with the same credentials as the kubernetes client; async, so
        # the session is made on kopf's loop.
        info = kopf.login_via_client(**kwargs)
        return None if info is None else bounded_session(info, API_CONNECTIONS + watch_streams)

    @kopf.on.startup(id="configure", registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.posting.loggers = False  # Events are posted explicitly, on changes only
        settings.posting.reporting_component = EVENT_SOURCE
        settings.posting.reporting_instance = runtime.identity
        settings.posting.event_name_prefix = "modelbudget-"
        settings.watching.server_timeout = 300
        # The namespaces/CRDs to serve come from the command line; scanning would need cluster-wide
        # list rights on namespaces and CRDs that least-privilege RBAC does not grant.
        settings.scanning.disabled = True
        memo.runtime = runtime
        memo.release_memory = asyncio.create_task(memory.keep_releasing(), name="release-memory")
        if runtime.elector is not None:
            # Runs on kopf's loop for the operator's lifetime; stopped by the cleanup handler.
            memo.election = asyncio.create_task(
                runtime.elector.run(lambda leading: telemetry.LEADER.set(int(leading))), name="leader-election"
            )

    @kopf.on.cleanup(id="stop-background", registry=registry)
    async def stop_background(memo: kopf.Memo, **_: Any) -> None:
        for task in (memo.get("election"), memo.get("release_memory")):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="forget", optional=True, registry=registry)
    def forget(name: str, namespace: str | None, **_: Any) -> None:
        # optional: never blocks a deletion; a missed one only leaves stale gauges until restart.
        telemetry.forget(namespace or "", name)

    @kopf.timer(GROUP, VERSION, POOL_PLURAL, id="settle-pool", interval=interval, registry=registry)
    async def settle_pool(
        name: str,
        body: kopf.Body,
        patch: kopf.Patch,
        memo: Any,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        **_: Any,
    ) -> None:
        rt: Runtime = memo.runtime
        if not rt.owns_pool(name):
            return
        try:
            claimants = await asyncio.to_thread(rt.claims.claimants, name)
        except Unavailable as exc:  # after a start: the ModelBudgets are not all listed yet
            logger.info("pool not settled this tick: %s", exc)
            return
        try:
            outcome = await rt.pools.reconcile(
                name,
                copy.deepcopy(body.get("spec") or {}),
                copy.deepcopy(body.get("status") or {}),
                claimants,
                datetime.now(UTC),
            )
        except Exception as exc:
            telemetry.ERRORS.labels("ReconcileFailed").inc()
            logger.error("pool reconcile failed, retrying next tick: %s: %s", type(exc).__name__, exc)
            return
        if outcome.status_patch:
            patch.status.update(outcome.status_patch)
        telemetry.record_pool(name, outcome.status)
        for note in outcome.events:
            kopf.event(body, type=note.type, reason=note.reason.value, message=note.message)
            if note.type == "Warning":
                telemetry.ERRORS.labels(note.reason.value).inc()

    def this_shards(name: str, namespace: str | None, **_: Any) -> bool:
        return runtime.owns(namespace or "", name)

    def another_shards(name: str, namespace: str | None, **_: Any) -> bool:
        return not this_shards(name, namespace)

    # Another shard's ModelBudget gets a timer here too, one that does nothing once an hour: kopf
    # keeps its finalizer on an object only while a timer matches it, so with none here this
    # process would remove the finalizer the owning shard's kopf adds, and the two would take
    # turns.  Filtering the reconcile timer by shard (instead of returning early from it) spares
    # each process the timer ticks of the ModelBudgets it does not own: at 3,000 over 3 shards,
    # 2,000 wake-ups per interval per process.
    @kopf.timer(GROUP, VERSION, PLURAL, id="other-shard", interval=3600, when=another_shards, registry=registry)
    async def other_shard(**_: Any) -> None:
        return

    # sharp: each tick is an interval after the previous one started, so a ModelBudget keeps the
    # phase its first tick took (controller/spread.py) however long its reconciles take.
    @kopf.timer(
        GROUP, VERSION, PLURAL, id="reconcile", interval=interval, sharp=True, when=this_shards, registry=registry
    )
    async def reconcile(
        name: str,
        namespace: str | None,
        meta: kopf.Meta,
        body: kopf.Body,
        patch: kopf.Patch,
        memo: Any,
        logger: logging.Logger | logging.LoggerAdapter[Any],
        **_: Any,
    ) -> None:
        assert namespace is not None  # ModelBudget is a namespaced kind
        rt: Runtime = memo.runtime
        if not memo.get("phased"):
            memo.phased = True
            await asyncio.sleep(phase(namespace, name, interval))  # spreads the ticks; blocks nothing
        if not rt.leading():
            memo.pop("carried", None)
            return
        term = rt.term
        carried = memo.get("carried") if memo.get("carried_term") == term else None
        version = meta.get("resourceVersion")
        written = ahead_of_watch(memo.get("written"), version)
        if written is None:
            memo.pop("written", None)
        seen = status_seen(body.get("status") or {}, version, written)
        started = time.monotonic()
        try:
            outcome = await rt.reconciler.reconcile(
                ObjectRef(namespace, name, meta.get("generation"), meta.get("uid") or ""),
                copy.deepcopy(body.get("spec") or {}),
                copy.deepcopy(seen),
                carried,
                datetime.now(UTC),
            )
        except Exception as exc:
            telemetry.ERRORS.labels("ReconcileFailed").inc()
            logger.error("reconcile failed, retrying next tick: %s: %s", type(exc).__name__, exc)
            return
        finally:
            telemetry.RECONCILE_SECONDS.observe(time.monotonic() - started)
        if outcome.status_patch:
            patch.status.update(outcome.status_patch)
            memo.written = Written(version, status_document(outcome.status))
        for note in outcome.events:
            kopf.event(body, type=note.type, reason=note.reason.value, message=note.message)
        for problem in outcome.problems:
            telemetry.ERRORS.labels(problem.value).inc()
        done = outcome.reconciled
        if done is None:
            telemetry.record_conditions(namespace, name, outcome.status.conditions)
            return
        memo.carried, memo.carried_term = done.decision.next_state, term
        spend = outcome.status.spend
        telemetry.record(
            namespace,
            name,
            done.resolved.spec,
            done.observation,
            done.decision,
            outcome.status.conditions,
            spend.projected_period_end if spend is not None else None,
        )
        for action in done.actions:
            logger.info("%s %s: %s -> %s", action.knob.value, action.target, action.before, action.after)
