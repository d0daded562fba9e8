"""Running the gate and the synthetic model server as real processes on 127.0.0.1 (unit and e2e tests, bench)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start(cmd: list[str], health: str, want: set[int], log: Path | None) -> subprocess.Popen[bytes]:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115  # the child holds it open
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while http_status(health) not in want:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}" + (f"; see {log}" if log else ""))
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{cmd[:4]} did not answer {health} in 30s")
        time.sleep(0.05)
    return proc


def start_model_server(*args: str, log: Path | None = None, taskset: str | None = None) -> Process:
    """The synthetic model server alone (no cluster): its OpenAI API on a free port."""
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "modelbudget.testbed.modelserver", "--deployment", "model", "--no-cluster"]
    cmd += ["--listen", url.removeprefix("http://"), *args]
    return Process(_start(_pinned(cmd, taskset), f"{url}/healthz", {200}, log), url)


@dataclass
class GateProcess(Process):
    metrics_url: str

    def metric(self, name: str, **labels: str) -> float | None:
        return metric_value(self.metrics_url, name, **labels)


def start_gate(
    upstream: str,
    *args: str,
    target: str = "model",
    ready: bool = True,
    log: Path | None = None,
    taskset: str | None = None,
) -> GateProcess:
    """``modelbudget gate`` in front of ``upstream``; waits until it knows a limit unless ``ready=False``."""
    port, metrics_port = free_port(), free_port()
    cmd = [str(Path(sys.executable).with_name("modelbudget")), "gate", "--target", target, "--upstream", upstream]
    cmd += ["--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics_port}", *args]
    metrics_url = f"http://127.0.0.1:{metrics_port}"
    proc = _start(_pinned(cmd, taskset), f"{metrics_url}/healthz", {200} if ready else {200, 503}, log)
    return GateProcess(proc, f"http://127.0.0.1:{port}", metrics_url)


def _pinned(cmd: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def metric_value(metrics_url: str, name: str, **labels: str) -> float | None:
    """One sample of ``name`` (with ``labels`` a subset of its labels) from a /metrics page; None if absent."""
    with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=5) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return None


def write_limits(directory: Path, **data: str) -> None:
    """Publish limits as a mounted ConfigMap would be: one file per key, swapped in atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    for key, value in data.items():
        tmp = directory / f".{key}.tmp"
        tmp.write_text(value)
        tmp.rename(directory / key)


@contextlib.contextmanager
def running(*processes: Process) -> Iterator[None]:
    try:
        yield
    finally:
        for p in processes:
            p.stop()


@dataclass(frozen=True)
class RawReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(method: str, url: str, content: bytes | None = None, json_body: object = None) -> RawReply:
    """One HTTP request with aiohttp, for what a well-behaved client never sends (headers lower-cased)."""

    async def go() -> RawReply:
        data = json.dumps(json_body).encode() if json_body is not None else content
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(method, url, data=data, headers={"Content-Type": "application/json"}) as r,
        ):
            return RawReply(r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read())

    return asyncio.run(go())


def abandon_stream(url: str, json_body: object) -> bytes:
    """Start a streaming request, read its first bytes, then drop the connection like a client that left."""

    async def go() -> bytes:
        async with aiohttp.ClientSession() as session:
            r = await session.post(url, json=json_body)
            first = await r.content.readany()
            r.close()  # closes the connection under the unfinished response
            return first

    return asyncio.run(go())


class TcpRelay:
    """A TCP relay on 127.0.0.1 that a test can cut: the apiserver becomes unreachable without touching it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        relay = self

        class Pipe(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    upstream = socket.create_connection(relay.target, timeout=5)
                except OSError:
                    return
                with relay._lock:
                    relay._open.update({self.request, upstream})
                try:
                    pair = {self.request: upstream, upstream: self.request}
                    while True:
                        readable, _, _ = select.select(list(pair), [], [], 1.0)
                        for sock in readable:
                            data = sock.recv(65536)
                            if not data:
                                return
                            pair[sock].sendall(data)
                except OSError:
                    return
                finally:
                    upstream.close()

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Pipe)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def cut(self) -> None:
        """Stop listening and drop every relayed connection."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()
            self._open.clear()


def scrape(targets_dir: str | Path, gate: GateProcess, namespace: str, pod: str) -> Path:
    """Register the gate's metrics port with the testbed's Prometheus (file discovery), as the pod ``pod``.

    The target carries ``namespace`` and ``pod`` the way pod relabelling would on a cluster.
    Returns the file; delete it to stop the scrape.
    """
    address = gate.metrics_url.removeprefix("http://")
    path = Path(targets_dir) / f"gate-{namespace}-{pod}.json"
    tmp = path.with_suffix(".tmp")  # write then rename: Prometheus never reads half a file
    tmp.write_text(json.dumps([{"targets": [address], "labels": {"namespace": namespace, "pod": pod}}]))
    tmp.rename(path)
    return path
