"""Runs the gate: the proxy on the serving port, the metrics on their own port, the limit sources."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics, generate_latest

from modelbudget.gate.admission import TokenBucket
from modelbudget.gate.limits import ADMITTED_RPS_KEY, Limits, LimitsHolder
from modelbudget.gate.metrics import GateMetrics
from modelbudget.gate.proxy import Gate, gate_app
from modelbudget.gate.sources import ConfigMapWatch, MountedDirectory, api_client

log = logging.getLogger("modelbudget.gate")


@dataclass(frozen=True)
class GateOptions:
    listen: tuple[str, int]
    metrics_listen: tuple[str, int]
    upstream: str
    target: str
    namespace: str
    config_map: str
    limit_key: str
    watch: bool
    kubeconfig: str | None
    limits_dir: Path | None
    limits_poll_seconds: float
    default_max_tokens: int | None
    admission_wait: float
    admission_burst_seconds: float
    max_body_bytes: int
    upstream_read_timeout: float


def metrics_app(metrics: GateMetrics, holder: LimitsHolder) -> web.Application:
    async def scrape(_request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(metrics.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def healthz(_request: web.Request) -> web.Response:
        # Ready to enforce once a limit is known; the serving port answers 503 until then.
        known = holder.current is not None
        return web.Response(status=200 if known else 503, text="ok\n" if known else "no token limit yet\n")

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(options: GateOptions) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series only double the scrape
    metrics = GateMetrics(options.target)
    default = Limits(options.default_max_tokens, None) if options.default_max_tokens else None
    holder = LimitsHolder(options.limit_key, default, metrics.limits_applied, metrics.config_errors.inc)
    bucket = TokenBucket(options.admission_wait, options.admission_burst_seconds)
    gate = Gate(options.upstream, holder, bucket, metrics, upstream_read_timeout=options.upstream_read_timeout)

    watch = None
    if options.watch:
        api = api_client(options.kubeconfig)
        watch = ConfigMapWatch(
            api,
            options.namespace,
            options.config_map,
            lambda data, source: loop.call_soon_threadsafe(holder.offer, data, source),
        )
        watch.start()
    poller = None
    if options.limits_dir is not None:
        mounted = MountedDirectory(options.limits_dir, (options.limit_key, ADMITTED_RPS_KEY))
        connected = (lambda: watch.connected) if watch else (lambda: False)
        poller = asyncio.create_task(mounted.poll(options.limits_poll_seconds, holder.offer, connected))

    # handler_cancellation: a client that disconnects cancels its handler, and so the request upstream.
    runners = [
        web.AppRunner(gate_app(gate, options.max_body_bytes), access_log=None, handler_cancellation=True),
        web.AppRunner(metrics_app(metrics, holder), access_log=None),
    ]
    for runner, (host, port) in zip(runners, (options.listen, options.metrics_listen), strict=True):
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
    log.info(
        "gate for %s/%s on %s:%d -> %s; metrics on %s:%d; limits from ConfigMap %s%s",
        options.namespace,
        options.target,
        *options.listen,
        options.upstream,
        *options.metrics_listen,
        options.config_map if options.watch else "(not watched)",
        f" and {options.limits_dir}" if options.limits_dir else "",
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        if watch is not None:
            watch.stop()
        for runner in runners:
            await runner.cleanup()
