"""Prometheus history for a trace, in seconds: the synthetic server's metrics as OpenMetrics.

``python -m modelbudget.testbed.backfill -f mb.yaml --trace trace.csv --out history.om --tsdb data/``
renders what Prometheus would have scraped, every ``--scrape-interval`` seconds, from a server
that served the trace: the vLLM metric families of ``testbed/modelserver.py`` (same names, labels
and buckets), one series per pod, plus the kube-state-metrics series a cluster would show for
the fleet (``kube_deployment_status_replicas``, ``kube_node_labels``).  ``--tsdb`` then loads the
file with ``promtool tsdb create-blocks-from openmetrics``; ``serve_history`` (or
``--serve PORT``) starts a Prometheus on those blocks.

The server is an ample fixed fleet: every request starts when it arrives (nothing waits), on
pod ``i mod pods``, and decodes at ``tokensPerSecond / maxConcurrency`` tokens/s like a vLLM
sequence; what it generates is ``min(W, --token-limit)``.  Counters move when a request
finishes (tokens included), which is what the request-rate and histogram queries read.

What a real Prometheus produces can be shaped in: ``--gap A:B`` (no scrapes between seconds
A and B, as when Prometheus was down), ``--restart-at T`` (the server restarted: every counter
and histogram starts again from 0) and ``--without FAMILY`` (a family never exported).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt
from prometheus_client.utils import floatToGoString as _untyped_go_float

from modelbudget.api import ModelBudget
from modelbudget.gate.metrics import TOKEN_BUCKETS
from modelbudget.sim.trace import Trace, read_trace, repeat_daily
from modelbudget.testbed.modelserver import E2E_BUCKETS, TTFT_BUCKETS

FloatArray = npt.NDArray[np.float64]
DEFAULT_START = "2023-11-16T00:00:00+00:00"  # the default start of ``modelbudget simulate``
SIMULATE_START = datetime.fromisoformat(DEFAULT_START)


def go_float(value: float) -> str:
    """A bucket bound as prometheus_client writes it (``1.0``, ``+Inf``), so ``le`` matches a real scrape."""
    return str(_untyped_go_float(value))  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class Fleet:
    namespace: str
    model_name: str  # also the Deployment's name
    pods: int = 4
    tokens_per_second: float = 2000.0  # per pod, with a full batch
    max_concurrency: int = 32
    token_limit: int | None = None
    pool: str = "gpu"
    node_label: tuple[str, str] = ("modelbudget.dev/pool", "gpu")
    nodes: int = 1


@dataclass(frozen=True)
class Shape:
    """What makes the history look like a real Prometheus' rather than a perfect one."""

    gaps: tuple[tuple[float, float], ...] = ()  # [from, to) seconds without scrapes
    restarts: tuple[float, ...] = ()  # seconds at which every counter starts again from 0
    without: frozenset[str] = field(default_factory=frozenset)  # families never exported


@dataclass(frozen=True, eq=False)
class Served:
    """Per request: pod, start and finish times, tokens, and whether the limit cut it."""

    pod: npt.NDArray[np.int64]
    start: FloatArray
    finish: FloatArray
    prompt: FloatArray
    generated: FloatArray
    cut: npt.NDArray[np.bool_]


def serve(trace: Trace, reasoning_factor: float, fleet: Fleet) -> Served:
    wanted = trace.wanted(reasoning_factor)
    limit = fleet.token_limit if fleet.token_limit is not None else math.inf
    generated = np.minimum(wanted, limit)
    speed = fleet.tokens_per_second / fleet.max_concurrency
    return Served(
        pod=np.arange(len(trace)) % fleet.pods,
        start=trace.arrival,
        finish=trace.arrival + generated / speed,
        prompt=trace.prompt,
        generated=generated,
        cut=wanted > limit,
    )


def scrape_times(span: float, interval: float, shape: Shape) -> FloatArray:
    times = np.arange(0.0, span + interval, interval)
    for a, b in shape.gaps:
        times = times[(times < a) | (times >= b)]
    return times


def _cumulative(
    event_times: FloatArray, weights: FloatArray | None, times: FloatArray, restarts: FloatArray
) -> FloatArray:
    """A counter's value at ``times``: the sum of ``weights`` of events up to then, since the last restart."""
    order = np.argsort(event_times, kind="stable")
    at = event_times[order]
    sums = np.concatenate([[0.0], np.cumsum(weights[order] if weights is not None else np.ones(at.size))])

    def total(t: FloatArray) -> FloatArray:
        out: FloatArray = sums[np.searchsorted(at, t, side="right")]
        return out

    value = total(times)
    if restarts.size:
        last = np.searchsorted(restarts, times, side="right") - 1
        base = np.where(last >= 0, total(restarts[np.maximum(last, 0)]), 0.0)
        value = value - base
    return value


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


class OpenMetricsWriter:
    """Writes families one at a time (OpenMetrics forbids interleaving them), series in time order."""

    def __init__(self, out: IO[str], times: FloatArray, origin: float) -> None:
        self.out = out
        self.stamps = [f"{origin + t:.3f}" for t in times]

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.out.write(f"# TYPE {name} {kind}\n# HELP {name} {help_text}\n")

    def series(self, samples: Sequence[tuple[str, str, FloatArray]]) -> None:
        """One metric's points: at each time, every ``(name, labels, values)`` sample of the point."""
        # Values are finite counts and gauges: Python's float text is valid OpenMetrics for them.
        columns = [(f"{name}{labels} ", [str(v) for v in values.tolist()]) for name, labels, values in samples]
        lines = []
        for i, stamp in enumerate(self.stamps):
            for prefix, values in columns:
                lines.append(f"{prefix}{values[i]} {stamp}\n")
        self.out.write("".join(lines))

    def end(self) -> None:
        self.out.write("# EOF\n")


def render(served: Served, fleet: Fleet, times: FloatArray, origin: float, shape: Shape, out: IO[str]) -> int:
    """Write the history as OpenMetrics; returns the number of samples written."""
    w = OpenMetricsWriter(out, times, origin)
    restarts = np.sort(np.asarray(shape.restarts, dtype=float))
    base = [("model_name", fleet.model_name), ("namespace", fleet.namespace)]
    pods = [f"{fleet.model_name}-{i}" for i in range(fleet.pods)]
    samples = 0

    def counter(name: str, help_text: str, at: FloatArray, weight: FloatArray | None, by_reason: bool = False) -> None:
        nonlocal samples
        if name in shape.without:
            return
        w.family(name, "counter", help_text)
        for p, pod in enumerate(pods):
            mine = served.pod == p
            groups = (("stop", ~served.cut), ("length", served.cut)) if by_reason else ((None, mine),)
            for reason, sel in groups:
                sel = sel & mine
                labels = [*base, ("pod", pod)] + ([("finished_reason", reason)] if reason else [])
                values = _cumulative(at[sel], None if weight is None else weight[sel], times, restarts)
                w.series([(f"{name}_total", _labels(labels), values)])
                samples += times.size

    def histogram(name: str, help_text: str, at: FloatArray, value: FloatArray, buckets: Sequence[float]) -> None:
        nonlocal samples
        if name in shape.without:
            return
        w.family(name, "histogram", help_text)
        for p, pod in enumerate(pods):
            mine = served.pod == p
            labels = [*base, ("pod", pod)]
            columns = []
            for le in [*buckets, math.inf]:
                sel = mine & (value <= le)
                columns.append(
                    (
                        f"{name}_bucket",
                        _labels([*labels, ("le", go_float(le))]),
                        _cumulative(at[sel], None, times, restarts),
                    )
                )
            columns.append((f"{name}_count", _labels(labels), _cumulative(at[mine], None, times, restarts)))
            columns.append((f"{name}_sum", _labels(labels), _cumulative(at[mine], value[mine], times, restarts)))
            w.series(columns)
            samples += times.size * len(columns)

    def gauge(name: str, help_text: str, per_series: Sequence[tuple[list[tuple[str, str]], FloatArray]]) -> None:
        nonlocal samples
        if name in shape.without:
            return
        w.family(name, "gauge", help_text)
        for labels, values in per_series:
            w.series([(name, _labels(labels), values)])
            samples += times.size

    fin, start = served.finish, served.start
    counter("vllm:prompt_tokens", "Prefill tokens processed.", start, served.prompt)
    counter("vllm:generation_tokens", "Generation tokens processed.", fin, served.generated)
    counter("vllm:request_success", "Finished requests.", fin, None, by_reason=True)
    running = []
    for p, pod in enumerate(pods):
        mine = served.pod == p
        begun = np.searchsorted(np.sort(start[mine]), times, side="right")
        ended = np.searchsorted(np.sort(fin[mine]), times, side="right")
        running.append(([*base, ("pod", pod)], (begun - ended).astype(float)))
    gauge("vllm:num_requests_running", "Requests in the batch.", running)
    gauge("vllm:num_requests_waiting", "Requests queued.", [(lbl, np.zeros(times.size)) for lbl, _ in running])
    speed = fleet.tokens_per_second / fleet.max_concurrency
    histogram("vllm:e2e_request_latency_seconds", "End-to-end latency.", fin, fin - start, E2E_BUCKETS)
    histogram(
        "vllm:time_to_first_token_seconds", "Time to first token.", fin, np.full(fin.size, 1 / speed), TTFT_BUCKETS
    )
    histogram("vllm:request_generation_tokens", "Generated tokens per request.", fin, served.generated, TOKEN_BUCKETS)
    histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", start, served.prompt, TOKEN_BUCKETS)
    deployment = [("deployment", fleet.model_name), ("namespace", fleet.namespace)]
    gauge(
        "kube_deployment_status_replicas",
        "Replicas of the Deployment.",
        [(deployment, np.full(times.size, fleet.pods))],
    )
    label = "label_" + "".join(c if c.isalnum() else "_" for c in fleet.node_label[0])
    nodes = [
        ([("node", f"{fleet.pool}-{i}"), (label, fleet.node_label[1])], np.ones(times.size)) for i in range(fleet.nodes)
    ]
    gauge("kube_node_labels", "Kubernetes labels of the node.", nodes)
    w.end()
    return samples


def fleet_for(manifest: ModelBudget, pods: int, tokens_per_second: float | None, token_limit: int | None) -> Fleet:
    """The fleet the manifest describes: its first pool, as many nodes as ``pods`` replicas take."""
    spec = manifest.spec
    pool = spec.node_pools[0]
    label = next(iter((pool.node_selector or {"modelbudget.dev/pool": pool.name}).items()))
    per_node = pool.gpus_per_node // spec.replicas.gpus_per_replica
    return Fleet(
        namespace=manifest.metadata.namespace or "default",
        model_name=spec.target_ref.name,
        pods=pods,
        tokens_per_second=tokens_per_second or pool.tokens_per_second_per_replica,
        token_limit=token_limit,
        pool=pool.name,
        node_label=label,
        nodes=math.ceil(pods / per_node),
    )


def create_blocks(openmetrics: Path, tsdb: Path, promtool: str = "promtool") -> None:
    """Load an OpenMetrics file into TSDB blocks under ``tsdb`` (``promtool`` prints what it made).

    promtool reads the whole file once per block, and its blocks are 2 h by default: a week of
    history took it 140 s that way, and 5 s with week-long blocks.
    """
    tsdb.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            promtool,
            "tsdb",
            "create-blocks-from",
            "openmetrics",
            "--max-block-duration=168h",
            str(openmetrics),
            str(tsdb),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"promtool could not load {openmetrics}: {(done.stderr or done.stdout)[-2000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_history(tsdb: Path, port: int | None = None, prometheus: str = "prometheus") -> Iterator[str]:
    """A Prometheus on 127.0.0.1 answering from the blocks in ``tsdb`` (scraping nothing); yields its URL."""
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="mb-history-") as work:
        config = Path(work) / "prometheus.yml"
        config.write_text("global:\n  scrape_interval: 15s\n")
        log = (Path(work) / "prometheus.log").open("w")
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tsdb}",
                "--storage.tsdb.retention.time=100y",  # the history is old: keep it
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"prometheus exited: {(Path(work) / 'prometheus.log').read_text()[-2000:]}")
                with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("prometheus not ready within 60s")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def backfill(
    manifest: ModelBudget,
    trace: Trace,
    out: Path,
    *,
    reasoning_factor: float = 1.0,
    start: datetime = SIMULATE_START,
    scrape_interval: float = 15.0,
    pods: int = 4,
    tokens_per_second: float | None = None,
    token_limit: int | None = None,
    shape: Shape = Shape(),
) -> int:
    """Render ``trace`` served by the manifest's fleet into ``out`` (OpenMetrics); returns samples written."""
    fleet = fleet_for(manifest, pods, tokens_per_second, token_limit)
    served = serve(trace, reasoning_factor, fleet)
    times = scrape_times(float(served.finish.max()) if len(trace) else 0.0, scrape_interval, shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        return render(served, fleet, times, start.timestamp(), shape, fh)


def _span(text: str) -> tuple[float, float]:
    a, sep, b = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected FROM:TO seconds, got {text!r}")
    return float(a), float(b)


def main(argv: list[str] | None = None) -> None:
    from modelbudget.cli.common import load_manifest

    p = argparse.ArgumentParser(prog="python -m modelbudget.testbed.backfill", description=__doc__.split("\n")[0])
    p.add_argument("-f", "--file", required=True, help="the ModelBudget whose series to write (labels, pool)")
    p.add_argument("--trace", required=True)
    p.add_argument("--reasoning-factor", type=float, default=20.0, help="wanted tokens W = generated x F")
    p.add_argument("--repeat-daily", type=float, metavar="HOURS", help="tile the trace to HOURS (diurnal envelope)")
    p.add_argument("--start", default=DEFAULT_START, help="wall-clock time of the trace's start")
    p.add_argument("--scrape-interval", type=float, default=15.0)
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--tokens-per-second", type=float, help="per pod (default: the first pool's)")
    p.add_argument("--token-limit", type=int, help="the limit the fleet enforced (default: none)")
    p.add_argument("--gap", type=_span, action="append", default=[], help="FROM:TO seconds without scrapes")
    p.add_argument("--restart-at", type=float, action="append", default=[], help="seconds: counters reset")
    p.add_argument("--without", action="append", default=[], help="a metric family to leave out")
    p.add_argument("--out", required=True, help="the OpenMetrics file to write")
    p.add_argument("--tsdb", help="also load it into TSDB blocks in this directory (promtool)")
    p.add_argument("--serve", type=int, metavar="PORT", help="then serve --tsdb on 127.0.0.1:PORT until Ctrl-C")
    args = p.parse_args(argv)
    manifest = load_manifest(args.file)
    trace = read_trace(args.trace)
    start = datetime.fromisoformat(args.start)
    start = start if start.tzinfo else start.replace(tzinfo=UTC)
    if args.repeat_daily:
        day = (start - start.replace(hour=0, minute=0, second=0, microsecond=0)).total_seconds()
        trace = repeat_daily(trace, args.repeat_daily, 0.3, 0, day)
    began = time.monotonic()
    shape = Shape(tuple(args.gap), tuple(args.restart_at), frozenset(args.without))
    samples = backfill(
        manifest,
        trace,
        Path(args.out),
        reasoning_factor=args.reasoning_factor,
        start=start,
        scrape_interval=args.scrape_interval,
        pods=args.pods,
        tokens_per_second=args.tokens_per_second,
        token_limit=args.token_limit,
        shape=shape,
    )
    print(f"wrote {samples} samples of {len(trace)} requests to {args.out} in {time.monotonic() - began:.1f}s")
    if args.tsdb:
        began = time.monotonic()
        create_blocks(Path(args.out), Path(args.tsdb), shutil.which("promtool") or "promtool")
        print(f"loaded into {args.tsdb} in {time.monotonic() - began:.1f}s")
    if args.serve:
        if not args.tsdb:
            p.error("--serve needs --tsdb")
        with serve_history(Path(args.tsdb), args.serve) as url:
            print(f"Prometheus on {url} (history from {start.isoformat()}); Ctrl-C stops it", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()


if __name__ == "__main__":
    main()
