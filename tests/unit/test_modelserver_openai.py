"""The synthetic model server's OpenAI API on its own, with the `openai` client: lengths, finish reasons, pacing."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import openai
import pytest

from tests.e2e.gatekit import Process, raw_request, start_model_server

# One batch slot at 40 tokens/s and a 0.5 s queue: a long request holds the only slot.
SERVER_ARGS = ("--tokens-per-second-per-replica", "40", "--max-concurrency", "1", "--queue-timeout", "0.5")


@pytest.fixture(scope="module")
def server() -> Iterator[Process]:
    s = start_model_server(*SERVER_ARGS, "--model-name", "tiny")
    yield s
    s.stop()


def client(server: Process) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_generates_min_of_wanted_and_max_tokens(server: Process) -> None:
    api = client(server)
    cut = api.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a b c"}], max_tokens=3, extra_body={"wanted_tokens": 9}
    )
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content == " tok" * 3
    assert cut.usage is not None and (cut.usage.prompt_tokens, cut.usage.completion_tokens) == (3, 3)
    done = api.completions.create(model="tiny", prompt="x", max_tokens=8, extra_body={"wanted_tokens": 2})
    assert done.choices[0].finish_reason == "stop" and done.usage and done.usage.completion_tokens == 2
    # The completions API's default max_tokens is 16.
    default = api.completions.create(model="tiny", prompt="x", extra_body={"wanted_tokens": 20})
    assert default.usage and default.usage.completion_tokens == 16


def test_streams_sse_chunks_then_done_with_usage_on_request(server: Process) -> None:
    stream = client(server).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_completion_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"wanted_tokens": 10},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == " tok" * 4
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    raw = raw_request(
        "POST", f"{server.url}/v1/completions", json_body={"prompt": "x", "stream": True, "max_tokens": 2}
    )
    assert raw.headers["content-type"] == "text/event-stream" and raw.body.endswith(b"data: [DONE]\n\n")


def test_models_and_bad_requests(server: Process) -> None:
    assert [m.id for m in client(server).models.list()] == ["tiny"]
    for body in (
        b"{",
        b'{"prompt": "x", "max_tokens": 0}',
        b'{"max_tokens": 5}',
        b'{"prompt": "x", "wanted_tokens": -2}',
    ):
        r = raw_request("POST", f"{server.url}/v1/completions", body)
        assert r.status == 400 and r.json()["error"]["message"]


def test_a_full_batch_queues_then_answers_503_after_the_queue_timeout(server: Process) -> None:
    # 40 tokens at 40 tokens/s hold the only slot for about a second, past the 0.5 s queue timeout.
    holder = threading.Thread(
        target=client(server).completions.create,
        kwargs={"model": "tiny", "prompt": "x", "max_tokens": 40, "extra_body": {"wanted_tokens": 40}},
    )
    holder.start()
    statuses = []
    try:
        for _ in range(200):  # until the holder has the slot: then this one must wait and time out
            try:
                client(server).completions.create(
                    model="tiny", prompt="x", max_tokens=1, extra_body={"wanted_tokens": 1}
                )
                statuses.append(200)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)
                break
    finally:
        holder.join()
    assert statuses[-1] == 503
