"""The gate for real on 127.0.0.1, in front of the synthetic model server's OpenAI API, driven by the `openai` client.

Raw HTTP (httpx) only for what a well-behaved client cannot send. A hand-made upstream
only where the real server cannot show a failure (a response broken off mid-stream).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from aiohttp import web

from modelbudget.testbed.demand import read_trace, wanted_tokens
from tests.e2e.gatekit import (
    REPO,
    GateProcess,
    Process,
    abandon_stream,
    free_port,
    raw_request,
    start_gate,
    start_model_server,
    write_limits,
)

LIMIT = 40
# Fast enough for tests, slow enough that a long generation is still running when a client leaves.
SERVER_ARGS = ("--tokens-per-second-per-replica", "2000", "--max-concurrency", "2", "--queue-timeout", "5")


@pytest.fixture(scope="module")
def model_server() -> Iterator[Process]:
    server = start_model_server(*SERVER_ARGS)
    yield server
    server.stop()


@pytest.fixture
def limits_dir(tmp_path: Path) -> Path:
    write_limits(tmp_path / "limits", max_tokens=str(LIMIT))
    return tmp_path / "limits"


@pytest.fixture
def gate(model_server: Process, limits_dir: Path, tmp_path: Path) -> Iterator[GateProcess]:
    g = start_gate(
        model_server.url,
        "--no-watch",
        "--limits-dir",
        str(limits_dir),
        "--limits-poll-interval",
        "0.1",
        "--max-body-bytes",
        "65536",
        log=tmp_path / "gate.log",
    )
    yield g
    g.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def wanted(n: int) -> dict[str, object]:
    return {"extra_body": {"wanted_tokens": n}}


class TestClamp:
    def test_chat_non_streaming_is_cut_at_the_limit(self, gate: GateProcess) -> None:
        reply = client(gate.url).chat.completions.create(
            model="model", messages=[{"role": "user", "content": "hi"}], max_tokens=500, **wanted(1000)
        )
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage is not None and reply.usage.completion_tokens == LIMIT
        assert gate.metric("modelbudget_gate_clamped_total") == 1

    def test_completions_streaming_is_cut_at_the_limit(self, gate: GateProcess) -> None:
        stream = client(gate.url).completions.create(
            model="model", prompt="a b c", max_tokens=10**12, stream=True, **wanted(1000)
        )
        chunks = list(stream)
        text = "".join(c.choices[0].text for c in chunks)
        assert text.count("tok") == LIMIT
        assert chunks[-1].choices[0].finish_reason == "length"

    def test_chat_streaming_without_a_cap_gets_the_limit(self, gate: GateProcess) -> None:
        stream = client(gate.url).chat.completions.create(
            model="model", messages=[{"role": "user", "content": "hi"}], stream=True, **wanted(1000)
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks).count("tok") == LIMIT
        assert chunks[-1].choices[0].finish_reason == "length"
        assert gate.metric("modelbudget_gate_uncapped_total") == 1

    def test_requests_under_the_limit_are_untouched(self, gate: GateProcess) -> None:
        api = client(gate.url)
        short = api.completions.create(model="model", prompt="x", max_tokens=30, **wanted(5))
        assert short.choices[0].finish_reason == "stop" and short.usage and short.usage.completion_tokens == 5
        cut = api.completions.create(model="model", prompt="x", max_tokens=30, **wanted(100))
        assert cut.choices[0].finish_reason == "length" and cut.usage and cut.usage.completion_tokens == 30
        assert gate.metric("modelbudget_gate_clamped_total") == 0
        assert gate.metric("modelbudget_gate_requested_max_tokens_count") == 2

    def test_other_paths_and_streams_pass_byte_for_byte(self, gate: GateProcess, model_server: Process) -> None:
        assert [m.id for m in client(gate.url).models.list()] == ["model"]
        for path in ("/v1/models", "/healthz"):
            assert raw_request("GET", gate.url + path).body == raw_request("GET", model_server.url + path).body
        request = {"model": "model", "prompt": "x", "max_tokens": 8, "stream": True, "wanted_tokens": 20}
        through = raw_request("POST", gate.url + "/v1/completions", json_body=request)
        direct = raw_request("POST", model_server.url + "/v1/completions", json_body=request)
        assert through.headers["content-type"] == direct.headers["content-type"] == "text/event-stream"

        def normalised(body: bytes) -> bytes:  # ids and timestamps differ per request, nothing else may
            return re.sub(rb'"id":"[^"]+","object":"([a-z_.]+)","created":\d+', rb"\1", body)

        assert normalised(through.body) == normalised(direct.body)
        assert through.body.endswith(b"data: [DONE]\n\n")
        # Pass-through paths are not counted as arrivals.
        assert gate.metric("modelbudget_gate_arrivals_total") == 1


class TestPublishedLimits:
    def test_a_changed_file_applies_and_garbage_keeps_the_last_good_value(
        self, gate: GateProcess, limits_dir: Path
    ) -> None:
        assert gate.metric("modelbudget_gate_token_limit") == LIMIT
        assert gate.metric("modelbudget_gate_admitted_rps") == float("inf")
        write_limits(limits_dir, max_tokens="12")
        wait_for_metric(gate, "modelbudget_gate_token_limit", 12)
        reply = client(gate.url).completions.create(model="model", prompt="x", max_tokens=100, **wanted(50))
        assert reply.usage and reply.usage.completion_tokens == 12
        write_limits(limits_dir, max_tokens="twelve")
        wait_for_metric(gate, "modelbudget_gate_config_errors_total", 1)
        reply = client(gate.url).completions.create(model="model", prompt="x", max_tokens=100, **wanted(50))
        assert reply.usage and reply.usage.completion_tokens == 12
        assert gate.metric("modelbudget_gate_token_limit") == 12

    def test_no_limit_yet_answers_503_never_forwards_unclamped(self, model_server: Process, tmp_path: Path) -> None:
        g = start_gate(model_server.url, "--no-watch", "--limits-dir", str(tmp_path / "empty"), ready=False)
        try:
            with pytest.raises(openai.APIStatusError) as err:
                client(g.url).completions.create(model="model", prompt="x", max_tokens=5)
            assert err.value.status_code == 503
            assert err.value.response.headers["retry-after"] == "1"
            assert g.metric("modelbudget_gate_rejected_total", reason="no_limit") == 1
            assert g.metric("modelbudget_gate_forwarded_total") == 0
        finally:
            g.stop()


def wait_for_metric(gate: GateProcess, name: str, value: float, timeout: float = 10.0, **labels: str) -> None:
    deadline = time.monotonic() + timeout
    while gate.metric(name, **labels) != value:
        assert time.monotonic() < deadline, f"{name} never became {value} (is {gate.metric(name, **labels)})"
        time.sleep(0.05)


def test_admission_cap_answers_429_with_retry_after(model_server: Process, tmp_path: Path) -> None:
    write_limits(tmp_path / "l", max_tokens="5", admitted_rps_per_pod="0.5")
    g = start_gate(model_server.url, "--no-watch", "--limits-dir", str(tmp_path / "l"), "--admission-wait", "0.1")
    try:
        api = client(g.url)
        first = api.completions.create(model="model", prompt="x", max_tokens=5, **wanted(5))
        assert first.usage and first.usage.completion_tokens == 5  # the burst admits one
        with pytest.raises(openai.RateLimitError) as err:
            api.completions.create(model="model", prompt="x", max_tokens=5)
        assert err.value.status_code == 429
        assert int(err.value.response.headers["retry-after"]) >= 1
        assert err.value.response.json()["error"]["code"] == "rate_limit_exceeded"
        assert g.metric("modelbudget_gate_rejected_total", reason="admission") == 1
        assert g.metric("modelbudget_gate_admitted_rps") == 0.5
        assert g.metric("modelbudget_gate_arrivals_total") == 2
        assert g.metric("modelbudget_gate_forwarded_total") == 1
    finally:
        g.stop()


class TestBadInput:
    @pytest.mark.parametrize(
        ("content", "status", "param"),
        [
            (b"{not json", 400, None),
            (b"[]", 400, None),
            (b'{"prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
            (b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
            (b'{"prompt": "x", "max_tokens": "100"}', 400, "max_tokens"),
            (b'{"prompt": "x", "max_tokens": 1e3}', 400, "max_tokens"),
            (b'{"prompt": "x", "max_tokens": 1000000000000, "wanted_tokens": 100}', 200, None),
            (b'{"prompt": "' + b"x" * 70000 + b'"}', 413, None),
        ],
    )
    def test_is_answered_and_the_gate_keeps_serving(
        self, gate: GateProcess, content: bytes, status: int, param: str | None
    ) -> None:
        r = raw_request("POST", gate.url + "/v1/completions", content)
        assert r.status == status, r.body
        if status == 200:
            assert r.json()["usage"]["completion_tokens"] == LIMIT
        else:
            assert r.json()["error"]["param"] == param
            assert r.json()["error"]["message"]
        ok = client(gate.url).completions.create(model="model", prompt="x", max_tokens=3, **wanted(3))
        assert ok.usage and ok.usage.completion_tokens == 3

    def test_client_leaving_mid_stream_cancels_the_upstream_request(self, gate: GateProcess, limits_dir: Path) -> None:
        # Two batch slots upstream and a 5 s queue timeout: had the gate kept the two abandoned
        # generations (50000 tokens at 1000 tokens/s each) running, the next request would find no slot.
        write_limits(limits_dir, max_tokens="100000")
        wait_for_metric(gate, "modelbudget_gate_token_limit", 100000)
        for _ in range(2):
            body = {"model": "model", "prompt": "x", "max_tokens": 50000, "stream": True, "wanted_tokens": 50000}
            assert abandon_stream(gate.url + "/v1/completions", body).startswith(b"data: ")
        reply = client(gate.url).completions.create(model="model", prompt="x", max_tokens=100, **wanted(10))
        assert reply.usage and reply.usage.completion_tokens == 10
        wait_for_metric(gate, "modelbudget_gate_errors_total", 2, reason="client_disconnect")

    def test_unreachable_model_server_is_a_502(self, limits_dir: Path) -> None:
        g = start_gate(f"http://127.0.0.1:{free_port()}", "--no-watch", "--limits-dir", str(limits_dir))
        try:
            with pytest.raises(openai.APIStatusError) as err:
                client(g.url).completions.create(model="model", prompt="x", max_tokens=5)
            assert err.value.status_code == 502
            assert g.metric("modelbudget_gate_errors_total", reason="upstream_connect") == 1
        finally:
            g.stop()


@pytest.fixture
def breaking_upstream() -> Iterator[str]:
    """An upstream that starts an SSE stream, sends two events, then drops the connection."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        choice = {"index": 0, "text": " tok", "logprobs": None, "finish_reason": None}
        chunk = {"id": "x", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}
        event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
        await response.write(event * 2)
        assert request.transport is not None
        request.transport.abort()
        return response

    port = free_port()
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_upstream_breaking_off_mid_stream_ends_the_client_stream_with_an_error(
    breaking_upstream: str, limits_dir: Path
) -> None:
    g = start_gate(breaking_upstream, "--no-watch", "--limits-dir", str(limits_dir))
    try:
        stream = client(g.url).completions.create(model="model", prompt="x", max_tokens=5, stream=True)
        received = []
        with pytest.raises(openai.APIError):
            for chunk in stream:
                received.append(chunk.choices[0].text)
        assert received == [" tok", " tok"]  # what came through came through intact
        assert g.metric("modelbudget_gate_errors_total", reason="upstream_reset") == 1
    finally:
        g.stop()


TRACE = REPO.parent / "shared" / "data" / "traces" / "azure_llm_2023_conv.csv"


@pytest.mark.skipif(not TRACE.exists(), reason=f"{TRACE} is not there")
def test_loadgen_replays_a_real_trace_through_the_gate(gate: GateProcess) -> None:
    rows = read_trace(TRACE)[:30]
    cmd = [sys.executable, "-m", "modelbudget.testbed.loadgen", "--url", gate.url, "--trace", str(TRACE)]
    cmd += ["--max-requests", "30", "--time-scale", "0.01", "--reasoning-factor", "2", "--stream", "--duration", "30"]
    summary = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout)
    wanted = [wanted_tokens(r.generated_tokens, 2) for r in rows]
    assert summary["sent"] == summary["ok"] == 30
    assert summary["finishLength"] == sum(w > LIMIT for w in wanted) > 0
    assert summary["generatedTokens"] == sum(min(w, LIMIT) for w in wanted)
    assert gate.metric("modelbudget_gate_arrivals_total") == 30
    assert gate.metric("modelbudget_gate_uncapped_total") == 30


def test_concurrent_streams_never_mix_up_responses(gate: GateProcess) -> None:
    """Forty streams at once, each with its own size: each client gets exactly its own response."""

    async def one(api: openai.AsyncOpenAI, i: int) -> tuple[int, int, str | None, set[str]]:
        stream = await api.chat.completions.create(
            model="model",
            messages=[{"role": "user", "content": f"request {i}"}],
            max_tokens=i,
            stream=True,
            extra_body={"wanted_tokens": 2 * i},
        )
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        return i, text.count("tok"), chunks[-1].choices[0].finish_reason, {c.id for c in chunks}

    async def all_at_once() -> list[tuple[int, int, str | None, set[str]]]:
        api = openai.AsyncOpenAI(base_url=f"{gate.url}/v1", api_key="unused", max_retries=0, timeout=60)
        try:
            return await asyncio.gather(*(one(api, i) for i in range(1, 41)))
        finally:
            await api.close()

    results = asyncio.run(all_at_once())
    for i, tokens, reason, ids in results:
        assert tokens == min(i, LIMIT), i
        assert reason == "length"
        assert len(ids) == 1  # every chunk of a stream belongs to that stream
    assert len({next(iter(ids)) for *_, ids in results}) == 40
    assert gate.metric("modelbudget_gate_forwarded_total") == 40
