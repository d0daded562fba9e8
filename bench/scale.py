"""How the operator scales with the number of ModelBudgets, on the local testbed.

    hack/testbed.sh up
    .venv/bin/python bench/scale.py --quick        # N = 1, 20    (a couple of minutes)
    .venv/bin/python bench/scale.py                # N = 1, 100, 1000, 3000 over 3 shards
    .venv/bin/python bench/scale.py -n 1000 -n 3000/3

For each N: N Deployments of one replica whose pod never schedules (replicas 0..1, already at
what the plan asks) and N ModelBudgets whose metrics come from one synthetic model server, then
``modelbudget run`` as a subprocess. Once every ModelBudget has a plan and the writes of the
first decisions have died down, a steady window (demand constant, nothing to change) measures:

* reconcile latency p50/p99 from the operator's ``modelbudget_reconcile_duration_seconds``;
* operator CPU seconds and RSS from /proc;
* apiserver requests per reconcile by verb, from ``apiserver_request_total`` (kubectl get --raw
  /metrics) diffed over the window, minus the same window's rate measured before the operator
  started (the testbed's own controllers);
* writes in the steady state to what only the operator writes (ModelBudgets and their status,
  Deployments, ConfigMaps, ...; should be 0: status is written only on change or heartbeat);
* Prometheus queries per tick (one tick = one ``--interval``) from the operator's
  ``modelbudget_prometheus_queries_total``: with grouped observation, about one per query
  template, whatever N is;
* apiserver requests per tick (the operator's own, as above).

``-n N/K`` runs K operator processes, ``--shards K --shard I`` each, every one electing the
leader of its shard on a Lease of its own (one replica per shard: no standbys); their figures
are summed (latency histograms merged, CPU added), RSS is the largest process's.

``--selector-per-model`` gives each ModelBudget a selector of its own model name, as on a
platform serving N models: Prometheus then scrapes the synthetic server's series once per model
(``FanOut``: the same traffic under N ``model_name`` labels), so every group query's answer
holds N members' series and each ModelBudget plans from metrics of its own. Without it all
ModelBudgets read the one model's series.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NS = "scale-bench"
WRITES = ("POST", "PUT", "PATCH", "DELETE", "APPLY")
# What only the operator writes on the testbed. Events and Leases are written by the control plane
# too (the scheduler's FailedScheduling for the pods that never schedule, its own Leases): they are
# listed with the window's writes but not counted as the operator's.
OPERATOR_WRITES = (
    "modelbudgets",
    "modelbudgets/status",
    "deployments",
    "deployments/scale",
    "configmaps",
    "capacitybuffers",
    "gpupools/status",
    "kwoknodepools",
    "httproutes",
)


def sh(*cmd: str, stdin: str | None = None) -> str:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=True).stdout


def testbed_env() -> dict[str, str]:
    out = sh(str(REPO / "hack" / "testbed.sh"), "env")
    env = dict(re.findall(r"^export (\w+)=(.*)$", out, re.M))
    env["PATH"] = env["PATH"].replace("$PATH", os.environ["PATH"])
    return env


class Kube:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = {**os.environ, **env}
        self.kubeconfig = env["KUBECONFIG"]

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        return subprocess.run(
            ["kubectl", "--kubeconfig", self.kubeconfig, *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=True,
            env=self.env,
        ).stdout

    def requests_by_verb(self) -> Counter[str]:
        """apiserver_request_total summed by verb (all clients)."""
        return by_verb(self.requests())

    def requests(self) -> Counter[str]:
        """apiserver_request_total summed by "VERB resource[/subresource]" (all clients)."""
        totals: Counter[str] = Counter()
        for line in self.kubectl("get", "--raw", "/metrics").splitlines():
            if line.startswith("apiserver_request_total{"):
                labels, value = line.rsplit(" ", 1)
                found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
                if "verb" in found:
                    what = "/".join(x for x in (found.get("resource"), found.get("subresource")) if x)
                    totals[f"{found['verb']} {what}"] += int(float(value))
        return totals


def beyond(requests: Counter[str], baseline: Counter[str], scale: float) -> dict[str, int]:
    """Writes per "VERB resource" beyond the testbed's own (``baseline`` times ``scale``), resource
    by resource: summed over all resources, the Deployment controller's busy start (in the
    baseline) hid hundreds of the operator's status writes."""
    return {
        key: extra
        for key, c in requests.items()
        if key.split(" ", 1)[0] in WRITES and (extra := round(c - baseline.get(key, 0) * scale)) > 0
    }


def settle(kube: Kube, n: int, interval: float, baseline: Counter[str], window: float, most: int = 12) -> None:
    """Wait until the first decisions have played out: an interval with (about) no writes beyond
    the testbed's own (``baseline``, counted over ``window`` seconds before the operator ran; Events
    and Leases left out, which the control plane keeps writing for the pods that never schedule). With
    metrics of their own the ModelBudgets scale their Deployments up first, and the pods,
    ReplicaSets and Events that follow take the control plane a while at N = 1000; the steady
    window starts after."""
    for _ in range(most):
        before = kube.requests()
        time.sleep(interval)
        extra = sum(
            c
            for key, c in beyond(kube.requests() - before, baseline, interval / window).items()
            if key.split(" ", 1)[1] not in ("events", "leases")  # the scheduler's, for pods that never schedule
        )
        print(f"N={n}: settling, {extra} writes in the last interval", file=sys.stderr)
        if extra <= max(2.0, n / 200):
            return
    print(f"N={n}: still writing after {most} intervals; measuring anyway", file=sys.stderr)


def by_verb(requests: Counter[str]) -> Counter[str]:
    totals: Counter[str] = Counter()
    for key, count in requests.items():
        totals[key.split(" ", 1)[0]] += count
    return totals


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def counter(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(f"{name} "))


class FanOut:
    """An exporter that serves the model server's metrics once per model name: each line with
    ``model_name="bench"`` is repeated for every name. N models' worth of series for Prometheus
    to scrape, from one simulated fleet."""

    def __init__(self, upstream: str, names: Sequence[str]) -> None:
        copies = [f'model_name="{name}"' for name in names]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with urllib.request.urlopen(upstream, timeout=5) as answer:
                    text = answer.read().decode()
                lines: list[str] = []
                for line in text.splitlines():
                    if SERVED_MODEL in line:
                        lines.extend(line.replace(SERVED_MODEL, copy) for copy in copies)
                    else:
                        lines.append(line)
                body = ("\n".join(lines) + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


SERVED_MODEL = 'model_name="bench"'  # the model server's --deployment, its default model name


def model_name(i: int) -> str:
    return f"llm-{i:04d}"


def objects(n: int, prometheus: str, selector_per_model: bool = False) -> str:
    docs: list[dict[str, Any]] = []
    for i in range(n):
        name = model_name(i)
        labels = {"app": name}
        docs.append(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "namespace": NS},
                "spec": {
                    # The replica the plan asks for at this demand from the start, so the steady
                    # state is not preceded by a thousand scale-ups; its pod never schedules (no
                    # node has the label), so nothing about it changes while the window runs.
                    "replicas": 1,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "containers": [{"name": "c", "image": "fake.invalid/x"}],
                            "nodeSelector": {"scale-bench/unschedulable": "true"},
                        },
                    },
                },
            }
        )
        docs.append(
            {
                "apiVersion": "modelbudget.dev/v1alpha1",
                "kind": "ModelBudget",
                "metadata": {"name": name, "namespace": NS},
                "spec": {
                    "targetRef": {"name": name},
                    "curve": {"intercept": 0.1, "slope": 0.08, "minTokens": 64, "maxTokens": 4096},
                    # Per Month (about $100/h), not per Hour: a period that rolls over starts a new
                    # ledger, one status write per ModelBudget, which a window across the hour counted.
                    "budget": {"ceiling": {"amount": 72_000, "period": "Month"}, "valuePerPoint": 0.01},
                    "replicas": {"min": 0, "max": 1},
                    # No providerRef: pools are observed, never resized (they would all share one).
                    "nodePools": [
                        {
                            "name": "bench",
                            "gpuType": "nvidia-l4",
                            "pricePerGpuHour": 2,
                            "gpusPerNode": 2,
                            "maxNodes": 4,
                            "tokensPerSecondPerReplica": 1000,
                        }
                    ],
                    "metrics": {
                        "prometheusUrl": prometheus,
                        "selector": f'namespace="{NS}",model_name="{name if selector_per_model else "bench"}"',
                        "window": "30s",
                        "maxStalenessSeconds": 60,
                    },
                },
            }
        )
    return "\n".join(json.dumps(d) for d in docs)


def histogram(text: str, name: str) -> tuple[dict[float, float], float]:
    buckets: dict[float, float] = {}
    count = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = re.search(r'le="([^"]+)"', line)
            assert le is not None
            buckets[float(le.group(1))] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count"):
            count = float(line.rsplit(" ", 1)[1])
    return buckets, count


def quantile(q: float, buckets: dict[float, float]) -> float:
    """Upper bound of the bucket holding quantile ``q`` (cumulative bucket counts)."""
    total = max(buckets.values(), default=0.0)
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return le
    return float("nan")


def proc_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return cpu, rss


def scrape(addr: str) -> str:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        return r.read().decode()


def operator_command(kube: Kube, interval: float, metrics: str, shards: int, shard: int) -> list[str]:
    command = [
        str(Path(sys.executable).parent / "modelbudget"),
        "run",
        "--kubeconfig",
        kube.kubeconfig,
        "-n",
        NS,
        "--interval",
        str(interval),
        "--status-heartbeat",
        "3600",
        "-q",
        "--metrics-addr",
        metrics,
        "--liveness",
        f"http://127.0.0.1:{free_port()}/healthz",
    ]
    if shards == 1:
        return [*command, "--no-leader-election"]
    return [
        *command,
        *("--shards", str(shards), "--shard", str(shard)),
        *("--lease-namespace", NS, "--lease-name", "scale-bench", "--lease-duration", "15"),
    ]


def planned(addrs: list[str]) -> int:
    """ModelBudgets reconciled at least once, from the operators' own series (each shard exports
    its own ModelBudgets'): a LIST of 3,000 ModelBudgets with their statuses every few seconds was
    more than the loaded control plane answered within its timeout."""
    done = 0
    for addr in addrs:
        try:
            text = scrape(addr)
        except OSError:  # not serving yet
            continue
        done += sum(1 for line in text.splitlines() if line.startswith("modelbudget_replicas{") and PLANNED in line)
    return done


PLANNED = 'state="planned"'


def merged(texts: list[str]) -> tuple[dict[float, float], float, float]:
    """Reconcile-latency buckets, reconcile count and Prometheus queries, summed over processes."""
    buckets: dict[float, float] = {}
    count = queries = 0.0
    for text in texts:
        h, c = histogram(text, "modelbudget_reconcile_duration_seconds")
        for le, v in h.items():
            buckets[le] = buckets.get(le, 0.0) + v
        count += c
        queries += counter(text, "modelbudget_prometheus_queries_total")
    return buckets, count, queries


def run(
    n: int, shards: int, kube: Kube, env: dict[str, str], window: float, interval: float, selector_per_model: bool
) -> dict[str, Any]:
    kube.kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=true", "--timeout=300s")
    kube.kubectl("create", "namespace", NS)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modelbudget.testbed.modelserver",
            "--no-cluster",
            "--pods",
            "1",  # each ModelBudget's Deployment has at most one replica
            "--namespace",
            NS,
            "--deployment",
            "bench",
            "--listen",
            f"127.0.0.1:{port}",
            "--rate-curve",
            "0:2",
            # Evenly spaced arrivals: a steady state is steady demand. Poisson arrivals over the
            # 30 s window move the rate by about 20% a tick, and the plans (and statuses) with it.
            "--arrivals",
            "even",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    upstream = f"http://127.0.0.1:{port}/metrics"
    fan_out = FanOut(upstream, [model_name(i) for i in range(n)]) if selector_per_model else None
    scraped = fan_out.address if fan_out is not None else f"127.0.0.1:{port}"
    target = Path(env["MB_PROMETHEUS_TARGETS"]) / f"scale-bench-{port}.json"
    target.with_suffix(".tmp").write_text(json.dumps([{"targets": [scraped]}]))
    target.with_suffix(".tmp").rename(target)
    operators: list[subprocess.Popen[bytes]] = []
    try:
        kube.kubectl("apply", "--server-side", "-f", "-", stdin=objects(n, env["PROMETHEUS_URL"], selector_per_model))
        # The testbed's own request rate, before the operator runs.
        before = kube.requests()
        time.sleep(window)
        baseline = kube.requests() - before
        baseline_by_verb = by_verb(baseline)
        addrs = [f"127.0.0.1:{free_port()}" for _ in range(shards)]
        for shard, metrics in enumerate(addrs):
            log = (REPO / ".local" / "logs" / f"bench-scale-{n}-{shard}.log").open("wb")
            command = operator_command(kube, interval, metrics, shards, shard)
            operators.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        started = time.monotonic()
        deadline = 600 + 0.2 * n  # the first round of writes is the apiserver's: slower at larger N
        while True:
            done = planned(addrs)
            if done == n:
                break
            if time.monotonic() - started > deadline:
                raise SystemExit(f"N={n}: only {done} ModelBudgets were planned in {deadline:.0f} s")
            print(f"N={n}: {done} planned after {time.monotonic() - started:.0f} s", file=sys.stderr)
            time.sleep(5)
        first_plan = time.monotonic() - started
        settle(kube, n, interval, baseline, window)
        h0, c0, q0 = merged([scrape(a) for a in addrs])
        r0, cpu0 = kube.requests(), sum(proc_usage(o.pid)[0] for o in operators)
        time.sleep(window)
        h1, c1, q1 = merged([scrape(a) for a in addrs])
        queries = q1 - q0
        by_resource = kube.requests() - r0
        requests = by_verb(by_resource)
        usage = [proc_usage(o.pid) for o in operators]
        cpu1, rss = sum(cpu for cpu, _ in usage), max(mib for _, mib in usage)
        reconciles = c1 - c0
        delta = {le: h1[le] - h0.get(le, 0.0) for le in h1}
        own = {verb: requests[verb] - baseline_by_verb.get(verb, 0) for verb in requests}
        # Which objects the operator's writes went to (a status, an annotation, an Event...).
        window_writes = beyond(by_resource, baseline, 1.0)
        own_writes = {key: c for key, c in window_writes.items() if key.split(" ", 1)[1] in OPERATOR_WRITES}
        ticks = window / interval
        return {
            "n": n,
            "shards": shards,
            "first_plan_s": first_plan,
            "reconciles": reconciles,
            "p50": quantile(0.5, delta),
            "p99": quantile(0.99, delta),
            "cpu_per_reconcile_ms": 1000 * (cpu1 - cpu0) / max(reconciles, 1),
            "cpu_share": (cpu1 - cpu0) / window,
            "rss_mib": rss,
            "requests_per_reconcile": {v: c / max(reconciles, 1) for v, c in sorted(own.items()) if c > 0},
            "writes_per_reconcile": sum(own_writes.values()) / max(reconciles, 1),
            "queries_per_tick": queries / ticks,
            "api_requests_per_tick": sum(max(c, 0) for c in own.values()) / ticks,
            "writes_per_tick": sum(own_writes.values()) / ticks,
            "writes_in_window": dict(sorted(window_writes.items())),
        }
    finally:
        for operator in operators:
            operator.terminate()
        for operator in operators:
            try:
                operator.wait(timeout=60)
            except subprocess.TimeoutExpired:  # a loaded testbed can hold a graceful stop up
                operator.kill()
                operator.wait()
        server.terminate()
        target.unlink(missing_ok=True)
        if fan_out is not None:
            fan_out.close()
        # ModelBudgets carry kopf's finalizer: drop it so the namespace can go (one replace of
        # the whole list: a patch per object takes minutes at N = 1000).
        listed = json.loads(kube.kubectl("get", "modelbudgets", "-n", NS, "-o", "json"))
        for item in listed["items"]:
            item["metadata"]["finalizers"] = None
        if listed["items"]:
            kube.kubectl("replace", "-f", "-", stdin=json.dumps(listed))
        kube.kubectl("delete", "namespace", NS, "--wait=false")


DEFAULT_ROWS = [(1, 1), (100, 1), (1000, 1), (3000, 3)]


def row(text: str) -> tuple[int, int]:
    """ "N" or "N/K": N ModelBudgets over K shards."""
    n, _, shards = text.partition("/")
    try:
        count, over = int(n), int(shards or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want N or N/K (N ModelBudgets over K shards)") from None
    if count < 1 or over < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: N and K must be at least 1")
    return count, over


def label(r: dict[str, Any]) -> str:
    return f"{r['n']} ({r['shards']})" if r["shards"] > 1 else str(r["n"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N = 1 and 20 only")
    p.add_argument("-n", type=row, action="append", help="ModelBudget count, or N/K for N over K shards (repeatable)")
    p.add_argument("--interval", type=float, default=15.0, help="the operator's --interval")
    p.add_argument("--window", type=float, default=None, help="steady-state window, seconds (default 2x interval)")
    p.add_argument("--selector-per-model", action="store_true", help="each ModelBudget selects its own model name")
    args = p.parse_args()
    counts = args.n or ([(1, 1), (20, 1)] if args.quick else DEFAULT_ROWS)
    window = args.window or 2 * args.interval
    env = testbed_env()
    kube = Kube(env)
    kube.kubectl("apply", "-f", str(REPO / "crds" / "modelbudget.dev_modelbudgets.yaml"))
    rows = []
    for n, shards in counts:
        rows.append(run(n, shards, kube, env, window, args.interval, args.selector_per_model))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\nsteady state, --interval {args.interval:g}s, window {window:g}s\n")
    print(
        "|  N (shards) |   to plan s | reconciles | p50 s | p99 s | CPU ms/rec | CPU share | RSS MiB "
        "| PromQL/tick | API req/tick | writes/tick | reads/rec"
    )
    print(
        "|------------:|------------:|-----------:|------:|------:|-----------:|----------:|--------:"
        "|------------:|-------------:|------------:|:---------"
    )
    for r in rows:
        reads = ", ".join(f"{v} {c:.1f}" for v, c in r["requests_per_reconcile"].items() if v not in WRITES)
        print(
            f"| {label(r):>11} | {r['first_plan_s']:11.1f} | {r['reconciles']:10.0f} | {r['p50']:5.3g} | "
            f"{r['p99']:5.3g} | {r['cpu_per_reconcile_ms']:10.1f} | {r['cpu_share']:9.2f} | {r['rss_mib']:7.0f} | "
            f"{r['queries_per_tick']:11.1f} | {r['api_requests_per_tick']:12.1f} | {r['writes_per_tick']:11.2f} | "
            f"{reads}"
        )
    for r in rows:
        writes = ", ".join(f"{k} {c}" for k, c in r["writes_in_window"].items()) or "none"
        print(f"\nN={r['n']}: writes beyond the testbed's own rate in the window: {writes}")
    print(f"(writes/tick counts those to what only the operator writes: {', '.join(OPERATOR_WRITES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
