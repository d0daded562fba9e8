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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf

from modelbudget.api.spec import GROUP, PLURAL, VERSION
from modelbudget.controller import telemetry
from modelbudget.controller.leader import LeaderElector
from modelbudget.controller.reconciler import ObjectRef, Reconciler
from modelbudget.core.capacity import spend_of

FINALIZER = "modelbudget.dev/finalizer"


@dataclass
class Runtime:
    """What every handler shares: built once at startup by ``modelbudget run``."""

    reconciler: Reconciler
    elector: LeaderElector | None  # None: leader election disabled (one replica, development)

    def leading(self) -> bool:
        return self.elector is None or self.elector.is_leader

    @property
    def term(self) -> int:
        return 0 if self.elector is None else self.elector.term


def register(registry: kopf.OperatorRegistry, runtime: Runtime, interval: float) -> None:
    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # kopf talks to the apiserver with the same credentials as the kubernetes client.
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(id="configure", registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.posting.loggers = False  # Events are posted explicitly, on changes only
        settings.watching.server_timeout = 300
        # The namespaces/CRDs to serve come from the command line; scanning would need cluster-wide
        # list rights on namespaces and CRDs that least-privilege RBAC does not grant.
        settings.scanning.disabled = True
        memo.runtime = runtime
        if runtime.elector is not None:
            # Runs on kopf's loop for the operator's lifetime; stopped by the cleanup handler.
            memo.election = asyncio.create_task(
                runtime.elector.run(lambda leading: telemetry.LEADER.set(int(leading))), name="leader-election"
            )

    @kopf.on.cleanup(id="stop-election", registry=registry)
    async def stop_election(memo: kopf.Memo, **_: Any) -> None:
        task = memo.get("election")
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @kopf.timer(GROUP, VERSION, PLURAL, id="reconcile", interval=interval, registry=registry)
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
        if not rt.leading():
            memo.pop("carried", None)
            return
        term = rt.term
        carried = memo.get("carried") if memo.get("carried_term") == term else None
        started = time.monotonic()
        try:
            outcome = await rt.reconciler.reconcile(
                ObjectRef(namespace, name, meta.get("generation")),
                copy.deepcopy(body.get("spec") or {}),
                copy.deepcopy(body.get("status") or {}),
                carried,
                datetime.now(UTC),
            )
        except Exception as exc:
            telemetry.ERRORS.labels("ReconcileFailed").inc()
            logger.error("reconcile failed, retrying next tick: %s: %s", type(exc).__name__, exc)
            return
        finally:
            telemetry.RECONCILE_SECONDS.observe(time.monotonic() - started)
        if outcome.state is not None:
            memo.carried, memo.carried_term = outcome.state, term
        if outcome.status_patch:
            patch.status.update(outcome.status_patch)
        for note in outcome.events:
            kopf.event(body, type=note.type, reason=note.reason, message=note.message)
        for reason in outcome.errors:
            telemetry.ERRORS.labels(reason).inc()
        if outcome.spec is not None and outcome.plan is not None and outcome.observation is not None:
            obs, spec = outcome.observation, outcome.spec
            telemetry.record(namespace, name, spec, obs, outcome.plan, spend_of(obs.current_nodes, spec))
        for action in outcome.actions:
            logger.info("%s %s: %s -> %s", action.knob.value, action.target, action.before, action.after)
