"""Synthetic vLLM-like model server for the testbed.

Runs the serving model (``serving``) against demand (``demand``) on a fixed tick, with the
ready pods of a real Deployment as its replicas and the per-pod token limit read from a
ConfigMap, and exports vLLM-compatible metrics for Prometheus to scrape.

One process plays the whole fleet: the pods are kwok fakes that run nothing, so a single
aggregate exporter stands in for them and exports one series per simulated pod (labels
``model_name``, ``namespace``, ``pod``), which is what Prometheus would hold after scraping
real vLLM pods with pod relabelling. Queries that ``sum by (namespace, model_name)`` see the
same numbers either way. The queue is shared (see ``serving``), so ``num_requests_waiting``
is spread evenly over the ready pods; while none is ready it is exported with ``pod=""``
so the backlog stays visible.

The pods and the ConfigMap are polled (default every second) rather than watched: it is a
handful of objects on a local apiserver, and polling is level-triggered with no reconnect
logic. If the apiserver is unreachable, the last known state is kept.

HTTP on one port: ``GET /metrics``, ``GET /state`` (JSON), ``POST /control`` with JSON
``{"rps": 40}`` or ``{"rateCurve": "0:2,60:10"}`` (the new curve starts now), ``GET /healthz``,
and the OpenAI API of one replica (``openai_api``: ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``) for clients and the gate, paced by ``--pacing`` (``model``: the serving
model's per-sequence speed at the batch running now, its batch cap and queue; ``fast``: at once, for benchmarks). Those
requests are served apart from the simulated fleet and its metrics, and like vLLM they apply
no token limit of their own: enforcing one is the gate's job.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections import deque
from typing import Any

import numpy as np
from aiohttp import web
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from urllib3.exceptions import HTTPError

from modelbudget.api.spec import Serving
from modelbudget.core.serving import speed_of
from modelbudget.gate.metrics import TOKEN_BUCKETS
from modelbudget.testbed.demand import (
    Demand,
    LognormalSizes,
    RateDemand,
    TokenSizes,
    TraceDemand,
    TraceSizes,
    parse_rate_curve,
    read_trace,
    wanted_tokens,
)
from modelbudget.testbed.openai_api import OpenAIApi
from modelbudget.testbed.pacing import InstantPacer, Pacer, SlotPacer
from modelbudget.testbed.serving import ServingModel, TickResult, spread

log = logging.getLogger("modelserver")

# vLLM's latency buckets (vllm/engine/metrics.py); its 1-2-5 token buckets are the gate's.
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0]
E2E_BUCKETS += [120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
TTFT_BUCKETS += [20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
TPOT_BUCKETS = [
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
]
FINISH_REASONS = ("stop", "length")  # vLLM's finished_reason label values the server produces
OBSERVED_RATE_WINDOW = 10.0  # seconds of arrivals behind the observed req/s in /state


class VllmMetrics:
    """The vLLM metric families, one series per (model, namespace, pod)."""

    def __init__(
        self, registry: CollectorRegistry, model_name: str, namespace: str, gate_target: str | None = None
    ) -> None:
        self.base = (model_name, namespace)
        labels = ["model_name", "namespace", "pod"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", labels, registry=registry)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens processed.", labels, registry=registry
        )
        self.success = Counter(
            "vllm:request_success", "Finished requests.", [*labels, "finished_reason"], registry=registry
        )
        self.running = Gauge("vllm:num_requests_running", "Requests in the batch.", labels, registry=registry)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests queued.", labels, registry=registry)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end latency.",
            labels,
            buckets=E2E_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Time per output token (decode time over the tokens after the first).",
            labels,
            buckets=TPOT_BUCKETS,
            registry=registry,
        )
        self.generation_hist = Histogram(
            "vllm:request_generation_tokens",
            "Generated tokens per request.",
            labels,
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.prompt_hist = Histogram(
            "vllm:request_prompt_tokens",
            "Prompt tokens per request.",
            labels,
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        # Not a vLLM metric: vLLM never sees requests a gateway times out, but tests need the count.
        self.dropped = Counter(
            "modelserver_requests_dropped",
            "Requests dropped after the queue timeout.",
            ["model_name", "namespace"],
            registry=registry,
        )
        self._per_pod = [self.prompt_tokens, self.generation_tokens, self.running, self.waiting]
        self._per_pod += [self.e2e, self.ttft, self.tpot, self.generation_hist, self.prompt_hist]
        self._pods: set[str] = set()
        # This server applies the published limit to every request itself, as if each simulated pod
        # had a gate (modelbudget gate): it reports what a gate reports, under the gate's names, so
        # the operator sees the limit enforced and reads demand from arrivals. Off when a test runs
        # real gates instead.
        self.gate_target = gate_target
        self.gate_arrivals = Counter(
            "modelbudget_gate_arrivals",
            "Requests that arrived (built-in gate).",
            ["namespace", "target"],
            registry=registry,
        )
        self.gate_limit = Gauge(
            "modelbudget_gate_token_limit",
            "Token limit applied now (built-in gate).",
            ["namespace", "target", "pod"],
            registry=registry,
        )

    def record_arrivals(self, count: int) -> None:
        if self.gate_target is not None:
            self.gate_arrivals.labels(self.base[1], self.gate_target).inc(count)

    def set_gate_limits(self, pods: list[str], limit: int | None) -> None:
        if self.gate_target is None:
            return
        self.gate_limit.clear()  # a pod that is gone takes its gate with it
        if limit is not None:
            for pod in pods:
                self.gate_limit.labels(self.base[1], self.gate_target, pod).set(limit)

    def record(self, result: TickResult) -> None:
        for pod, request in result.started:
            self.prompt_tokens.labels(*self.base, pod).inc(request.prompt_tokens)
            self.prompt_hist.labels(*self.base, pod).observe(request.prompt_tokens)
        for pod, tokens in result.generated.items():
            self.generation_tokens.labels(*self.base, pod).inc(tokens)
        for f in result.finished:
            self.success.labels(*self.base, f.pod, f.finished_reason).inc()
            self.e2e.labels(*self.base, f.pod).observe(f.e2e_latency)
            self.ttft.labels(*self.base, f.pod).observe(f.time_to_first_token)
            if f.time_per_output_token is not None:
                self.tpot.labels(*self.base, f.pod).observe(f.time_per_output_token)
            self.generation_hist.labels(*self.base, f.pod).observe(f.generated_tokens)
        if result.dropped:
            self.dropped.labels(*self.base).inc(result.dropped)

    def set_queue(self, running: dict[str, int], waiting: int) -> None:
        pods = sorted(running)
        self._forget(self._pods - set(pods))
        # vLLM exports its finished-request counters at zero from the start, one per finish
        # reason: a server whose first answers are still decoding has a rate of 0, not no series.
        for pod in set(pods) - self._pods:
            for reason in FINISH_REASONS:
                self.success.labels(*self.base, pod, reason)
        self._pods = set(pods)
        for pod, n in running.items():
            self.running.labels(*self.base, pod).set(n)
        for pod, n in (spread(waiting, pods) if pods else {"": waiting}).items():
            self.waiting.labels(*self.base, pod).set(n)
        if pods:
            self._forget({""})

    def _forget(self, pods: set[str]) -> None:
        # A pod that is gone stops being a series, as it would when Prometheus loses its target.
        for pod in pods:
            for metric in self._per_pod:
                with contextlib.suppress(KeyError):
                    metric.remove(*self.base, pod)
            for reason in FINISH_REASONS:
                with contextlib.suppress(KeyError):
                    self.success.remove(*self.base, pod, reason)


class ClusterView:
    """Reads the Deployment's ready pods and the token-limit ConfigMap."""

    def __init__(self, api: client.ApiClient, namespace: str, deployment: str, configmap: str, key: str) -> None:
        # Any: the generated client types every model field Optional.
        self.apps: Any = client.AppsV1Api(api)
        self.core: Any = client.CoreV1Api(api)
        self.namespace, self.deployment, self.configmap, self.key = namespace, deployment, configmap, key

    def ready_pods(self) -> list[str]:
        dep = self.apps.read_namespaced_deployment(self.deployment, self.namespace)
        selector = ",".join(f"{k}={v}" for k, v in (dep.spec.selector.match_labels or {}).items())
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        return sorted(p.metadata.name for p in pods if _serving(p))

    def token_limit(self) -> int | None:
        try:
            cm = self.core.read_namespaced_config_map(self.configmap, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        value = (cm.data or {}).get(self.key)
        if value is None:
            return None
        try:
            limit = int(value)
        except ValueError:
            limit = 0
        if limit < 1:
            log.warning("ignoring token limit %r in ConfigMap %s key %s", value, self.configmap, self.key)
            return None
        return limit


def _serving(pod: Any) -> bool:
    if pod.metadata.deletion_timestamp or pod.status.phase != "Running":
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


class ModelServer:
    """Ties the model, the demand, the cluster view and the metrics together on a fixed tick."""

    def __init__(
        self,
        model: ServingModel,
        demand: Demand,
        sizes: TokenSizes,
        cluster: ClusterView | None,
        metrics: VllmMetrics,
        *,
        tick_seconds: float,
        poll_seconds: float,
        reasoning_factor: float,
        poisson: bool,
        rng: np.random.Generator,
        default_limit: int | None = None,
    ) -> None:
        self.model = model
        self.default_limit = default_limit
        self.demand = demand
        self.sizes = sizes
        self.cluster = cluster
        self.metrics = metrics
        self.tick_seconds, self.poll_seconds = tick_seconds, poll_seconds
        self.reasoning_factor, self.poisson, self.rng = reasoning_factor, poisson, rng
        self.lock = threading.Lock()
        self.now = 0.0
        self.totals = {"arrived": 0, "finished": 0, "dropped": 0, "generatedTokens": 0.0}
        self._recent: deque[tuple[float, int]] = deque()  # (tick time, arrivals) for the observed rate

    def poll(self) -> None:
        if self.cluster is None:
            return
        try:
            pods, limit = self.cluster.ready_pods(), self.cluster.token_limit()
        except (ApiException, HTTPError) as e:
            log.warning("cluster poll failed, keeping the last known state: %s", e)
            return
        with self.lock:
            self.model.set_ready_pods(pods)
            # Like a gate, the server applies its default until a limit is published.
            self.model.set_token_limit(limit if limit is not None else self.default_limit)

    def step(self) -> None:
        with self.lock:
            start, end = self.now, self.now + self.tick_seconds
            arrivals = self.demand.arrivals(start, end)
            self.model.submit(arrivals)
            # The engine serves each request from its own arrival time within the tick.
            result = self.model.tick(start, self.tick_seconds)
            self.now = end
            self.metrics.record(result)
            self.metrics.record_arrivals(len(arrivals))
            self.metrics.set_queue(self.model.running(), self.model.waiting)
            self.metrics.set_gate_limits(self.model.ready_pods, self.model.token_limit)
            self.totals["arrived"] += len(arrivals)
            self.totals["finished"] += len(result.finished)
            self.totals["dropped"] += result.dropped
            self.totals["generatedTokens"] += sum(result.generated.values())
            self._recent.append((end, len(arrivals)))
            while self._recent and self._recent[0][0] <= end - OBSERVED_RATE_WINDOW:
                self._recent.popleft()

    def control(self, body: dict[str, Any]) -> None:
        if "rps" in body:
            points = parse_rate_curve(f"0:{float(body['rps'])}")  # same checks as a curve
        elif "rateCurve" in body:
            points = parse_rate_curve(str(body["rateCurve"]))
        else:
            raise ValueError('expected {"rps": N} or {"rateCurve": "t:rps,..."}')
        with self.lock:
            self.demand = RateDemand(points, self.now, self.sizes, self.reasoning_factor, self.rng, self.poisson)

    def state(self) -> dict[str, Any]:
        with self.lock:
            window = min(self.now, OBSERVED_RATE_WINDOW) or 1.0
            return {
                "time": self.now,
                "rps": self.demand.rate(self.now),
                "observedRps": sum(n for _, n in self._recent) / window,
                "readyPods": self.model.ready_pods,
                "tokenLimit": self.model.token_limit,
                "queue": self.model.waiting,
                "running": self.model.running(),
                **self.totals,
            }

    def run(self, stop: threading.Event) -> None:
        # Fixed steps on the monotonic clock: a late tick is caught up, never stretched, so
        # the model time tracks wall time and runs are reproducible for a given pod history.
        t0 = time.monotonic()
        next_poll = 0.0
        while not stop.is_set():
            if self.now >= next_poll:
                self.poll()
                next_poll = self.now + self.poll_seconds
            self.step()
            stop.wait(max(0.0, t0 + self.now - time.monotonic()))


def http_app(server: ModelServer, registry: CollectorRegistry, api: OpenAIApi) -> web.Application:
    async def metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def state(_request: web.Request) -> web.Response:
        return web.json_response(server.state())

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def control(request: web.Request) -> web.Response:
        try:
            server.control(json.loads(await request.read() or b"{}"))
        except (ValueError, TypeError) as e:
            return web.json_response({"error": str(e)}, status=400)
        return web.json_response(server.state())

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics), web.get("/state", state), web.get("/healthz", healthz)])
    app.add_routes([web.post("/control", control), *api.routes()])
    return app


def serve_in_thread(app: web.Application, host: str, port: int) -> None:
    """Serve ``app`` on its own event loop in a daemon thread; returns once it listens."""
    listening = threading.Event()

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        listening.set()
        await asyncio.Event().wait()  # until the process exits

    threading.Thread(target=asyncio.run, args=(serve(),), name="http", daemon=True).start()
    if not listening.wait(30):
        raise RuntimeError(f"the HTTP server did not start on {host}:{port}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m modelbudget.testbed.modelserver", description=__doc__.split("\n")[0])
    p.add_argument("--deployment", required=True, help="Deployment whose ready pods serve")
    p.add_argument("--namespace", default="default")
    p.add_argument("--model-name", help="model_name label (default: the Deployment name)")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    p.add_argument("--no-cluster", action="store_true", help="serve with --pods fake pods, no apiserver")
    p.add_argument("--pods", type=int, default=1, help="number of fake ready pods with --no-cluster")
    p.add_argument("--listen", default=os.environ.get("MB_MODELSERVER_ADDR", "127.0.0.1:19400"), help="host:port")
    p.add_argument("--token-limit-configmap", help="default: <deployment>-token-limit")
    p.add_argument("--token-limit-key", default="max_tokens")
    p.add_argument(
        "--default-max-tokens", type=int, default=8192, help="limit applied until one is published (0: none)"
    )
    p.add_argument(
        "--no-builtin-gate",
        action="store_true",
        help="do not report the gate's metrics (real gates run in front of this server)",
    )
    demand = p.add_argument_group("demand")
    demand.add_argument("--trace", help="trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens)")
    demand.add_argument("--time-scale", type=float, default=1.0, help="trace time * this = wall time")
    demand.add_argument("--loop", action="store_true", help="restart the trace when it ends")
    demand.add_argument("--rate-curve", help='piecewise-linear req/s, "0:2,60:10,120:30"; sizes from --trace if given')
    demand.add_argument("--arrivals", choices=["poisson", "even"], default="poisson")
    demand.add_argument("--reasoning-factor", type=float, default=1.0, help="wanted tokens = generated * F")
    demand.add_argument("--prompt-tokens-mean", type=float, default=1000.0)
    demand.add_argument("--generated-tokens-mean", type=float, default=200.0)
    demand.add_argument("--tokens-sigma", type=float, default=0.8, help="lognormal sigma of sizes (0: fixed)")
    serving = p.add_argument_group("serving model")
    serving.add_argument(
        "--tokens-per-second-per-replica", type=float, default=2000.0, help="with a full batch (sets the default beta)"
    )
    serving.add_argument(
        "--max-num-seqs", "--max-concurrency", type=int, default=Serving().max_num_seqs, help="most sequences per batch"
    )
    serving.add_argument("--decode-alpha", type=float, default=Serving().decode_alpha_seconds, help="ITL alone, s")
    serving.add_argument("--decode-beta", type=float, help="ITL added per sequence in the batch, s")
    serving.add_argument("--prefill-tokens-per-second", type=float, default=Serving().prefill_tokens_per_second)
    serving.add_argument("--queue-timeout", type=float, default=60.0, help="seconds before a queued request drops")
    serving.add_argument("--tick", type=float, default=0.25, help="seconds per model step")
    serving.add_argument("--poll-interval", type=float, default=1.0, help="seconds between cluster polls")
    serving.add_argument("--seed", type=int, default=0)
    serving.add_argument(
        "--pacing",
        choices=["model", "fast"],
        default="model",
        help="the OpenAI API's token pace: the serving model of one replica, or at once (benchmarks)",
    )
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> tuple[ModelServer, CollectorRegistry, OpenAIApi]:
    rows = read_trace(args.trace) if args.trace else None
    sizes: TokenSizes = (
        TraceSizes(rows)
        if rows
        else LognormalSizes(args.prompt_tokens_mean, args.generated_tokens_mean, args.tokens_sigma)
    )
    rng = np.random.default_rng(args.seed)
    demand: Demand
    if rows and not args.rate_curve:
        demand = TraceDemand(rows, 0.0, args.time_scale, args.reasoning_factor, args.loop)
    else:
        points = parse_rate_curve(args.rate_curve or "0:0")
        demand = RateDemand(points, 0.0, sizes, args.reasoning_factor, rng, args.arrivals == "poisson")
    serving = Serving(
        max_num_seqs=args.max_num_seqs,
        decode_alpha_seconds=args.decode_alpha,
        decode_beta_seconds=args.decode_beta,
        prefill_tokens_per_second=args.prefill_tokens_per_second,
    )
    speed = speed_of(serving, args.tokens_per_second_per_replica)
    model = ServingModel(speed, args.queue_timeout)
    cluster = None
    if args.no_cluster:
        model.set_ready_pods(f"{args.deployment}-{i}" for i in range(args.pods))
    else:
        api = config.new_client_from_config(config_file=args.kubeconfig)  # type: ignore[no-untyped-call]
        configmap = args.token_limit_configmap or f"{args.deployment}-token-limit"
        cluster = ClusterView(api, args.namespace, args.deployment, configmap, args.token_limit_key)
    registry = CollectorRegistry()
    gate_target = None if args.no_builtin_gate else args.deployment
    metrics = VllmMetrics(registry, args.model_name or args.deployment, args.namespace, gate_target)
    server = ModelServer(
        model,
        demand,
        sizes,
        cluster,
        metrics,
        tick_seconds=args.tick,
        poll_seconds=args.poll_interval,
        reasoning_factor=args.reasoning_factor,
        poisson=args.arrivals == "poisson",
        rng=rng,
        default_limit=args.default_max_tokens or None,
    )
    if args.no_cluster:
        model.set_token_limit(server.default_limit)
    pacer: Pacer = InstantPacer() if args.pacing == "fast" else SlotPacer(speed, args.queue_timeout)
    # Its own generator: the tick loop's is used from another thread.
    api_rng = np.random.default_rng(args.seed + 1)
    api = OpenAIApi(
        pacer,
        args.model_name or args.deployment,
        lambda: wanted_tokens(sizes.sample(api_rng)[1], args.reasoning_factor),
    )
    return server, registry, api


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    disable_created_metrics()  # type: ignore[no-untyped-call]  # vLLM exports no *_created series
    server, registry, api = build(args)
    host, _, port = args.listen.rpartition(":")
    serve_in_thread(http_app(server, registry, api), host, int(port))
    log.info("serving %s/%s on http://%s", args.namespace, args.deployment, args.listen)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(threading.Event())


if __name__ == "__main__":
    main()
