"""The synthetic server's OpenAI HTTP API: ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``.

Like vLLM, it has no token limit of its own: a request generates ``min(wanted, max_tokens)``
tokens, with ``finish_reason`` ``"length"`` when ``max_tokens`` cut it and ``"stop"``
otherwise. ``wanted`` (what the request would generate unconstrained) is the testbed
extension field ``wanted_tokens`` in the body when given, else drawn from the server's token
sizes. Prompt tokens are counted as whitespace-separated words. Streaming answers are SSE
(``data: {...}`` events, then ``data: [DONE]``). How fast tokens come is the ``Pacer``'s
business (``pacing``).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from modelbudget.gate.clamp import ENDPOINTS, Endpoint, InvalidRequest, parse_request, requested_tokens
from modelbudget.testbed.pacing import Pacer, QueueTimeout

WANTED_TOKENS_FIELD = "wanted_tokens"
TOKEN_TEXT = " tok"


def _error(status: int, message: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": None, "code": None}}, status=status)


def _prompt_tokens(endpoint: Endpoint, payload: dict[str, Any]) -> int:
    if endpoint is Endpoint.CHAT:
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages must be a non-empty list", "messages")
        text = " ".join(str(m.get("content", "")) if isinstance(m, dict) else "" for m in messages)
    else:
        prompt = payload.get("prompt")
        if prompt is None:
            raise InvalidRequest("prompt is required", "prompt")
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return max(1, len(text.split()))


def _wanted(payload: dict[str, Any], draw: Callable[[], int]) -> int:
    value = payload.get(WANTED_TOKENS_FIELD)
    if value is None:
        return draw()
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequest(f"{WANTED_TOKENS_FIELD} must be an integer >= 1", WANTED_TOKENS_FIELD)
    return value


class OpenAIApi:
    def __init__(self, pacer: Pacer, model_name: str, draw_wanted_tokens: Callable[[], int]) -> None:
        self.pacer, self.model_name, self.draw = pacer, model_name, draw_wanted_tokens

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/models", self.models),
            web.post(Endpoint.COMPLETIONS.value, self.complete),
            web.post(Endpoint.CHAT.value, self.complete),
        ]

    async def models(self, _request: web.Request) -> web.Response:
        model = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "modelbudget-testbed"}
        return web.json_response({"object": "list", "data": [model]})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        endpoint = ENDPOINTS[request.path]
        try:
            payload = parse_request(await request.read())
            cap = requested_tokens(endpoint, payload)
            prompt_tokens = _prompt_tokens(endpoint, payload)
            wanted = _wanted(payload, self.draw)
        except InvalidRequest as exc:
            return _error(400, str(exc))
        tokens = wanted if cap is None else min(wanted, cap)
        reason = "length" if tokens < wanted else "stop"
        reply = _Reply(endpoint, payload.get("model") or self.model_name)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
        generation = self.pacer.generate(tokens)
        async with contextlib.aclosing(generation):  # type: ignore[type-var]  # releases the batch slot
            if not payload.get("stream"):
                try:
                    decoded = sum([n async for n in generation])
                except QueueTimeout as exc:
                    return _error(503, str(exc), "service_unavailable")
                return web.json_response(reply.whole(decoded, reason, usage))
            return await self._stream(request, reply, generation, reason, usage, payload)

    async def _stream(
        self,
        request: web.Request,
        reply: _Reply,
        generation: Any,
        reason: str,
        usage: dict[str, int],
        payload: dict[str, Any],
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            first = await anext(generation, 0)
        except QueueTimeout as exc:
            return _error(503, str(exc), "service_unavailable")
        await response.prepare(request)
        if reply.endpoint is Endpoint.CHAT:
            await response.write(_event(reply.chunk({"role": "assistant", "content": ""}, None)))
        if first:
            await response.write(_event(reply.chunk(TOKEN_TEXT * first, None)))
        async for n in generation:
            await response.write(_event(reply.chunk(TOKEN_TEXT * n, None)))
        last = reply.chunk("" if reply.endpoint is Endpoint.COMPLETIONS else {}, reason)
        if (payload.get("stream_options") or {}).get("include_usage"):
            last["usage"] = usage
        await response.write(_event(last))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class _Reply:
    """Builds the response objects of one request, in the shape of OpenAI's (and vLLM's)."""

    def __init__(self, endpoint: Endpoint, model: str) -> None:
        self.endpoint, self.model = endpoint, model
        self.id = ("chatcmpl-" if endpoint is Endpoint.CHAT else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, tokens: int, reason: str, usage: dict[str, int]) -> dict[str, Any]:
        text = TOKEN_TEXT * tokens
        if self.endpoint is Endpoint.CHAT:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
            head = self._head("text_completion")
        return {**head, "choices": [{**choice, "finish_reason": reason}], "usage": usage}

    def chunk(self, content: str | dict[str, Any], reason: str | None) -> dict[str, Any]:
        if self.endpoint is Endpoint.CHAT:
            delta = content if isinstance(content, dict) else {"content": content}
            return {
                **self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
            }
        return {
            **self._head("text_completion"),
            "choices": [{"index": 0, "text": content, "logprobs": None, "finish_reason": reason}],
        }
