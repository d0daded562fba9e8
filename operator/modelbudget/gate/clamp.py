"""The token clamp on the OpenAI completion paths: pure, bytes in, bytes out.

``max_tokens`` and ``max_completion_tokens`` become ``min(requested or inf, limit)``. What a
request asks for follows the servers' precedence (vLLM, OpenAI): on chat,
``max_completion_tokens`` wins over ``max_tokens`` and a request with neither is uncapped; on
the legacy completions path only ``max_tokens`` counts, and when it is absent the API's
default of 16 applies (so the clamp never raises what a client would have got without the
gate), while an explicit ``null`` means uncapped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


class Endpoint(Enum):
    COMPLETIONS = "/v1/completions"
    CHAT = "/v1/chat/completions"


ENDPOINTS = {e.value: e for e in Endpoint}


class InvalidRequest(ValueError):
    """A request the gate answers with 400 and an OpenAI-style error."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ClampedRequest:
    body: bytes
    requested: int | None  # tokens the client asked for; None: uncapped
    applied: int  # the cap forwarded
    clamped: bool  # the gate lowered (or imposed) the cap


def parse_request(raw: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("request body must be a JSON object")
    return payload


def requested_tokens(endpoint: Endpoint, payload: dict[str, Any]) -> int | None:
    """The token cap a request asks for (None: uncapped), validated as the servers do."""
    given = {field: _token_count(payload, field) for field in TOKEN_FIELDS if field in payload}
    if endpoint is Endpoint.CHAT:
        return given.get("max_completion_tokens") or given.get("max_tokens")
    return given.get("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)


def clamp(endpoint: Endpoint, raw: bytes, limit: int) -> ClampedRequest:
    payload = parse_request(raw)
    requested = requested_tokens(endpoint, payload)
    applied = limit if requested is None else min(requested, limit)
    for field in TOKEN_FIELDS:
        # The completions API has no max_completion_tokens: set it there only if a client sent one.
        if endpoint is Endpoint.CHAT or field == "max_tokens" or payload.get(field) is not None:
            payload[field] = applied
    # vLLM refuses min_tokens > max_tokens: a clamped request must not turn into a 400.
    min_tokens = payload.get("min_tokens")
    if isinstance(min_tokens, int) and not isinstance(min_tokens, bool) and min_tokens > applied:
        payload["min_tokens"] = applied
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return ClampedRequest(body, requested, applied, requested is None or applied < requested)


def _token_count(payload: dict[str, Any], field: str) -> int | None:
    value = payload[field]
    if value is None:
        return None
    # bool is an int in Python, not in JSON Schema: true is not a token count.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"{field} must be an integer, got {json.dumps(value)}", field)
    if value < 1:
        raise InvalidRequest(f"{field} must be at least 1, got {value}", field)
    return value
