"""What the gate costs on the request path, next to nginx and LiteLLM, on the same upstream and load, in one run.

    .venv/bin/python bench/gate.py            # writes its configs and logs under .local/bench-gate/

Upstream: the synthetic model server's OpenAI API in fast pacing (every request wants 16
tokens, no decode time), pinned to CPU 1 with the load generators. Each proxy is pinned to
CPU 0 (one core; nginx with one worker, LiteLLM with one worker):

- direct: no proxy (the baseline the others are compared with);
- nginx: Debian's package as a plain reverse proxy (keepalive upstream, no buffering);
- LiteLLM proxy, if it is installed in .local/bench-venv (``pip install 'litellm[proxy]'``);
- the gate, with a published limit of 1024 (it parses, clamps and re-serialises every body).

Per path: added latency over direct, p50 and p99, for sequential non-streaming chat requests
and for the time to the first byte of streaming ones (an aiohttp client, one request at a
time); and the most requests/s it carries on its one core (wrk, 64 connections,
non-streaming; the median of the rounds). The paths take turns over ``--rounds`` rounds, so
that load from elsewhere on a shared machine falls on all of them alike. Goal (issue 11): the
gate's added p99 within 2x nginx's and below LiteLLM's, and >= 10x one vLLM replica's request
rate (a few hundred req/s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.e2e.gatekit import Process, free_port, http_status, start_gate, start_model_server, write_limits  # noqa: E402

OUT = REPO / ".local" / "bench-gate"
LITELLM = REPO / ".local" / "bench-venv" / "bin" / "litellm"
PROXY_CPU, LOAD_CPU = "0", "1"
CHAT = {"model": "model", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 64}
# LiteLLM refuses to start without a master key; every path gets the same header.
MASTER_KEY = f"sk-bench-{secrets.token_hex(16)}"
HEADERS = {"Authorization": f"Bearer {MASTER_KEY}"}


def start_nginx(upstream: str) -> Process:
    port = free_port()
    up = upstream.removeprefix("http://")
    conf = OUT / "nginx.conf"
    conf.write_text(
        f"""daemon off;
worker_processes 1;
pid {OUT}/nginx.pid;
error_log {OUT}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {OUT}/nginx-body;
  proxy_temp_path {OUT}/nginx-proxy;
  upstream model {{ server {up}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://model;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""
    )
    proc = subprocess.Popen(["taskset", "-c", PROXY_CPU, "nginx", "-c", str(conf), "-p", str(OUT)])
    url = f"http://127.0.0.1:{port}"
    _wait(lambda: http_status(f"{url}/v1/models") == 200, proc, "nginx")
    return Process(proc, url)


def start_litellm(upstream: str) -> Process:
    port = free_port()
    conf = OUT / "litellm.yaml"
    conf.write_text(
        json.dumps(
            {
                "model_list": [
                    {
                        "model_name": "model",
                        "litellm_params": {"model": "openai/model", "api_base": f"{upstream}/v1", "api_key": "unused"},
                    }
                ],
                "litellm_settings": {"telemetry": False},
                "general_settings": {"master_key": MASTER_KEY},
            }
        )
    )
    log = open(OUT / "litellm.log", "wb")  # noqa: SIM115  # the child holds it
    cmd = ["taskset", "-c", PROXY_CPU, str(LITELLM), "--config", str(conf), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--num_workers", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait(lambda: http_status(f"{url}/health/liveliness") == 200, proc, "litellm", timeout=180)
    return Process(proc, url)


def _wait(ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{what} did not start (logs in {OUT})")
        time.sleep(0.2)


async def latencies(url: str, n: int, stream: bool) -> np.ndarray:
    """Seconds to the whole response (non-streaming) or to its first body byte (streaming), one at a time."""
    out = []
    body = {**CHAT, "stream": stream}
    async with aiohttp.ClientSession(headers=HEADERS) as session:
        for i in range(n + n // 10):
            start = time.perf_counter()
            async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                if r.status != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status}: {await r.text()}")
                if stream:
                    await r.content.readany()
                    elapsed = time.perf_counter() - start
                    await r.read()
                else:
                    await r.read()
                    elapsed = time.perf_counter() - start
            if i >= n // 10:  # the first tenth warms connections and caches
                out.append(elapsed)
    return np.array(out)


def max_rps(url: str, seconds: int, connections: int) -> float:
    script = OUT / "chat.lua"
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "{HEADERS["Authorization"]}"\n'
        f"wrk.body = {json.dumps(json.dumps(CHAT))}\n"
    )
    cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script)]
    out = subprocess.run([*cmd, f"{url}/v1/chat/completions"], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"{url}: wrk saw errors:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match, out
    return float(match.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="sequential requests per path and latency column")
    p.add_argument("--seconds", type=int, default=3, help="wrk duration per throughput measurement")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="the paths take turns this many times (shared machines)")
    args = p.parse_args()
    for tool in ("taskset", "wrk", "nginx"):
        if shutil.which(tool) is None:
            print(
                f"{tool} not found: apt-get install -y {'util-linux' if tool == 'taskset' else tool}", file=sys.stderr
            )
            return 2
    OUT.mkdir(parents=True, exist_ok=True)
    server_args = ("--pacing", "fast", "--generated-tokens-mean", "16", "--tokens-sigma", "0")
    upstream = start_model_server(*server_args, log=OUT / "modelserver.log", taskset=LOAD_CPU)
    started: list[Process] = [upstream]
    try:
        nginx = start_nginx(upstream.url)
        started.append(nginx)
        paths = {"direct": upstream.url, "nginx": nginx.url}
        if LITELLM.exists():
            litellm = start_litellm(upstream.url)
            started.append(litellm)
            paths["litellm"] = litellm.url
        else:
            print(f"LiteLLM not installed in {LITELLM.parent.parent}: skipped", file=sys.stderr)
        write_limits(OUT / "limits", max_tokens="1024")
        gate = start_gate(
            upstream.url, "--no-watch", "--limits-dir", str(OUT / "limits"), log=OUT / "gate.log", taskset=PROXY_CPU
        )
        started.append(gate)
        paths["gate"] = gate.url
        # The paths take turns, so that a load spike from elsewhere on the machine hits all of them alike.
        samples: dict[str, tuple[list[np.ndarray], list[np.ndarray], list[float]]] = {n: ([], [], []) for n in paths}
        for round_ in range(args.rounds):
            for name, url in paths.items():
                plain, first, rps = samples[name]
                plain.append(asyncio.run(latencies(url, args.requests // args.rounds, stream=False)))
                first.append(asyncio.run(latencies(url, args.requests // args.rounds, stream=True)))
                rps.append(max_rps(url, args.seconds, args.connections))
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for proc in reversed(started):
            proc.stop()
    rows = {n: (np.concatenate(pl), np.concatenate(fi), float(np.median(r))) for n, (pl, fi, r) in samples.items()}
    base_plain, base_first, _ = rows["direct"]

    def added(samples: np.ndarray, base: np.ndarray, q: float) -> str:
        return f"{(np.percentile(samples, q) - np.percentile(base, q)) * 1e3:.2f}"

    print(
        f"\n{args.requests} sequential requests per latency column, ms; max req/s: median of {args.rounds} "
        f"wrk -c{args.connections} {args.seconds}s runs; paths interleaved over {args.rounds} rounds"
    )
    print("| path | added p50 | added p99 | stream TTFB added p50 | TTFB added p99 | max req/s (1 core) |")
    print("|---|---|---|---|---|---|")
    for name, (plain, first, rps) in rows.items():
        if name == "direct":
            p50, p99 = np.percentile(plain, 50) * 1e3, np.percentile(plain, 99) * 1e3
            f50, f99 = np.percentile(first, 50) * 1e3, np.percentile(first, 99) * 1e3
            print(f"| direct (absolute) | {p50:.2f} | {p99:.2f} | {f50:.2f} | {f99:.2f} | {rps:.0f} (upstream) |")
            continue
        print(
            f"| {name} | {added(plain, base_plain, 50)} | {added(plain, base_plain, 99)} | "
            f"{added(first, base_first, 50)} | {added(first, base_first, 99)} | {rps:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
