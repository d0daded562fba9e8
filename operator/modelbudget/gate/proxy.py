"""The gate's HTTP side: an aiohttp server in front of the model server, an aiohttp client to it.

``POST /v1/completions`` and ``POST /v1/chat/completions`` are read (bounded), validated,
admitted and clamped; every other request is relayed untouched, body streamed both ways.
Responses are relayed byte for byte (the client does not decompress), streaming or not.

Failures are always answered and counted, never silent: a bad request gets 400/413, a
request over the admission cap 429 with ``Retry-After``, no known limit 503, an unreachable
model server 502/504 (OpenAI-style error bodies). If the model server breaks off a response
already under way, the client gets an SSE error event (for streams, as vLLM sends one) and
the connection is closed without the final chunk, so it cannot take the response for
complete. A client that goes away mid-response cancels the request to the model server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from modelbudget.gate.admission import Reject, TokenBucket
from modelbudget.gate.clamp import ENDPOINTS, Endpoint, InvalidRequest, clamp
from modelbudget.gate.limits import LimitsHolder
from modelbudget.gate.metrics import GateMetrics

log = logging.getLogger("modelbudget.gate")

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection"}
    | {"te", "trailer", "trailers", "transfer-encoding", "upgrade"}
)
REQUEST_HEADERS_DROPPED = HOP_BY_HOP | {"host", "content-length"}
RESPONSE_HEADERS_DROPPED = HOP_BY_HOP | {"content-length"}
NO_LIMIT_RETRY_AFTER = 1  # seconds; a limit usually arrives with the first watch event


def openai_error(
    status: int,
    message: str,
    kind: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


class Gate:
    def __init__(
        self,
        upstream: str,
        limits: LimitsHolder,
        bucket: TokenBucket,
        metrics: GateMetrics,
        *,
        upstream_read_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.limits, self.bucket, self.metrics, self.clock = limits, bucket, metrics, clock
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=upstream_read_timeout)
        self._session: aiohttp.ClientSession | None = None

    async def open(self, _app: web.Application | None = None) -> None:
        # No pool limit (the model server queues), and no decompression: bytes pass as they are.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, timeout=self.timeout)

    async def close(self, _app: web.Application | None = None) -> None:
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        endpoint = ENDPOINTS.get(request.path) if request.method == "POST" else None
        if endpoint is None:
            body = request.content if request.body_exists else None
            return await self._forward(request, body, None)
        return await self._clamped(request, endpoint)

    async def _clamped(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        started = self.clock()
        self.metrics.arrivals.inc()
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            self.metrics.rejected("too_large")
            return openai_error(413, f"request body is too large: {exc.text}", "invalid_request_error")
        limits = self.limits.current
        limit = limits.max_tokens if limits else 1  # validation below does not depend on the limit
        try:
            clamped = clamp(endpoint, raw, limit)
        except InvalidRequest as exc:
            self.metrics.rejected("bad_request")
            return openai_error(400, str(exc), "invalid_request_error", param=exc.param)
        if clamped.requested is None:
            self.metrics.uncapped.inc()
        else:
            self.metrics.requested_max_tokens.observe(clamped.requested)
        if limits is None:
            self.metrics.rejected("no_limit")
            return openai_error(
                503,
                "the gate has no token limit yet (the published ConfigMap was not read)",
                "service_unavailable",
                headers={"Retry-After": str(NO_LIMIT_RETRY_AFTER)},
            )
        self.bucket.set_rate(limits.admitted_rps, self.clock())
        admission = self.bucket.take(self.clock())
        if isinstance(admission, Reject):
            self.metrics.rejected("admission")
            return openai_error(
                429,
                f"over this server's admitted rate of {limits.admitted_rps:g} requests/s; retry later",
                "rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(admission.retry_after)},
            )
        if admission.wait:
            await asyncio.sleep(admission.wait)
        if clamped.clamped:
            self.metrics.clamped.inc()
        return await self._forward(request, clamped.body, started)

    async def _forward(
        self, request: web.Request, body: bytes | aiohttp.StreamReader | None, started: float | None
    ) -> web.StreamResponse:
        """Relay to the model server; ``started`` is set for metered (clamped-path) requests."""
        assert self._session is not None, "Gate.open() was not called"
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in REQUEST_HEADERS_DROPPED)
        url = URL(self.upstream + request.raw_path, encoded=True)
        before_upstream = self.clock()
        try:
            upstream = await self._session.request(
                request.method, url, data=body, headers=headers, allow_redirects=False
            )
        except TimeoutError:
            return self._upstream_failed(started, "upstream_timeout", 504, "the model server did not answer in time")
        except aiohttp.ClientConnectorError as exc:
            return self._upstream_failed(started, "upstream_connect", 502, f"cannot reach the model server: {exc}")
        except aiohttp.ClientError as exc:
            return self._upstream_failed(started, "upstream_disconnect", 502, f"the model server failed: {exc}")
        try:
            return await self._relay(request, upstream, started, before_upstream)
        finally:
            upstream.release()

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, started: float | None, before_upstream: float
    ) -> web.StreamResponse:
        upstream_answered = self.clock()
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            if key.lower() not in RESPONSE_HEADERS_DROPPED:
                response.headers.add(key, value)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        try:
            await response.prepare(request)
            if started is not None:
                self.metrics.forwarded.inc()
                self.metrics.added_latency.observe(before_upstream - started + self.clock() - upstream_answered)
            while True:
                try:
                    chunk = await upstream.content.readany()
                except (TimeoutError, aiohttp.ClientError) as exc:
                    await self._broken_off(request, response, upstream, started, exc)
                    return response
                if not chunk:
                    break
                await response.write(chunk)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            # The client went away (a failed write, or aiohttp cancelling the handler): stop the model server's work.
            upstream.close()
            if started is not None:
                self.metrics.error("client_disconnect")
            raise
        return response

    async def _broken_off(
        self,
        request: web.Request,
        response: web.StreamResponse,
        upstream: aiohttp.ClientResponse,
        started: float | None,
        exc: BaseException,
    ) -> None:
        log.warning("the model server broke off %s %s: %r", request.method, request.path, exc)
        if started is not None:
            self.metrics.error("upstream_reset")
        if upstream.content_type == "text/event-stream":
            error = {"error": {"message": "the model server broke off the response", "type": "upstream_error"}}
            await response.write(b"data: " + json.dumps(error).encode() + b"\n\n")
        # Closing the connection before the final chunk tells the client the response is incomplete.
        if request.transport is not None:
            request.transport.close()

    def _upstream_failed(self, started: float | None, reason: str, status: int, message: str) -> web.Response:
        log.warning("%s", message)
        if started is not None:
            self.metrics.error(reason)
        return openai_error(status, message, "upstream_error", code=reason)


def gate_app(gate: Gate, max_body_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes)
    app.on_startup.append(gate.open)
    app.on_cleanup.append(gate.close)
    app.router.add_route("*", "/{path:.*}", gate.handle)
    return app
