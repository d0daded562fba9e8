"""``modelbudget webhook``: the mutating admission webhook that adds the gate to labelled pods (docs/gate.md)."""

from __future__ import annotations

import argparse
import json
import logging
import ssl

from modelbudget.cli import CliError
from modelbudget.gate import GATE_PORT, METRICS_PORT
from modelbudget.gate.inject import DEFAULT_IMAGE, InjectOptions

WEBHOOK_PORT = 9443


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("webhook", help="serve the admission webhook that adds the gate to labelled pods")
    p.add_argument("--listen", default=f"0.0.0.0:{WEBHOOK_PORT}", help=f"host:port (default 0.0.0.0:{WEBHOOK_PORT})")
    p.add_argument("--tls-cert-file", required=True, help="PEM certificate the apiserver trusts (caBundle)")
    p.add_argument("--tls-key-file", required=True)
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"the gate image (default {DEFAULT_IMAGE})")
    p.add_argument("--gate-port", type=int, default=GATE_PORT)
    p.add_argument("--metrics-port", type=int, default=METRICS_PORT)
    p.add_argument("--limit-key", help="the token-limit key of the published ConfigMaps (default max_tokens)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from modelbudget.cli.gate import host_port
    from modelbudget.gate.webhook import review

    host, port = host_port(args.listen, "--listen")
    options = InjectOptions(
        image=args.image, gate_port=args.gate_port, metrics_port=args.metrics_port, limit_key=args.limit_key
    )
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        tls.load_cert_chain(args.tls_cert_file, args.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"cannot load the TLS certificate: {exc}") from exc

    async def mutate(request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            return web.json_response({"error": "expected an AdmissionReview"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "expected an AdmissionReview"}, status=400)
        return web.json_response(review(body, options))

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = web.Application()
    app.add_routes([web.post("/mutate", mutate), web.get("/healthz", healthz)])
    web.run_app(app, host=host, port=port, ssl_context=tls, access_log=None, print=None)
    return 0
