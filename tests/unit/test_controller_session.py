"""kopf's HTTP session: bounded, with kopf's own credentials and TLS settings."""

from __future__ import annotations

import asyncio
import ssl

import kopf

from modelbudget.controller.handlers import API_CONNECTIONS, bounded_session


def test_session_is_bounded_and_carries_the_credentials() -> None:
    info = kopf.ConnectionInfo(
        server="https://apiserver.example:6443",
        token="secret-token",
        scheme="Bearer",
        insecure=True,
        default_namespace="ops",
        priority=7,
    )

    async def build() -> tuple[kopf.AiohttpSession, int, str | None, ssl.SSLContext | bool | None]:
        made = bounded_session(info, API_CONNECTIONS + 3)
        session = made.aiohttp_session
        try:
            connector = session.connector
            assert connector is not None
            return made, connector.limit, session.headers.get("Authorization"), connector._ssl
        finally:
            await session.close()

    made, limit, authorization, context = asyncio.run(build())
    assert limit == API_CONNECTIONS + 3  # not aiohttp's or kopf's unbounded 0
    assert authorization == "Bearer secret-token"
    assert isinstance(context, ssl.SSLContext) and context.verify_mode is ssl.CERT_NONE  # insecure kept
    assert (made.server, made.default_namespace, made.priority) == (info.server, "ops", 7)
