"""Replay a request trace as real OpenAI HTTP requests (the `openai` client), bounded in count and time.

Each trace row (``TIMESTAMP,ContextTokens,GeneratedTokens``, read by ``demand.read_trace``)
becomes one request at its offset times ``--time-scale``: a prompt of ``ContextTokens`` words,
``max_tokens`` as given (or none), and the testbed extension ``wanted_tokens`` = generated x
``--reasoning-factor``, so the synthetic model server generates what the trace's request
would have. Point ``--url`` at the gate (or the model server). At the end it prints one JSON
summary: requests sent, answered, rejected with 429 (and their Retry-After), failed, cut at
the limit (``finish_reason="length"``), tokens, and latency percentiles.

    python -m modelbudget.testbed.loadgen --url http://127.0.0.1:8080 \\
        --trace ../shared/data/traces/azure_llm_2023_conv.csv --max-requests 200 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import openai

from modelbudget.testbed.demand import TraceRow, read_trace, wanted_tokens

PROMPT_WORD = "tok "


@dataclass
class Outcome:
    status: str  # "ok", "rejected" (429), "error"
    latency: float
    first_byte: float | None = None
    finish_reason: str | None = None
    tokens: int = 0
    retry_after: str | None = None


@dataclass
class Summary:
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: int = 0  # rows not sent because the duration ran out

    def as_dict(self) -> dict[str, Any]:
        ok = [o for o in self.outcomes if o.status == "ok"]
        latencies = np.array([o.latency for o in ok]) if ok else np.array([np.nan])
        firsts = np.array([o.first_byte for o in ok if o.first_byte is not None] or [np.nan])
        statuses = Counter(o.status for o in self.outcomes)
        return {
            "sent": len(self.outcomes),
            "ok": statuses["ok"],
            "rejected": statuses["rejected"],
            "errors": statuses["error"],
            "notSent": self.skipped,
            "finishLength": sum(o.finish_reason == "length" for o in ok),
            "generatedTokens": sum(o.tokens for o in ok),
            "retryAfter": sorted({o.retry_after for o in self.outcomes if o.retry_after}),
            "latencyP50": _finite(np.percentile(latencies, 50)),
            "latencyP99": _finite(np.percentile(latencies, 99)),
            "firstByteP50": _finite(np.percentile(firsts, 50)),
        }


def _finite(x: float) -> float | None:
    return round(float(x), 4) if np.isfinite(x) else None


async def _one(api: openai.AsyncOpenAI, row: TraceRow, args: argparse.Namespace, model: str) -> Outcome:
    extra: dict[str, Any] = {"wanted_tokens": wanted_tokens(row.generated_tokens, args.reasoning_factor)}
    cap = {"max_tokens": args.max_tokens} if args.max_tokens else {}
    prompt = PROMPT_WORD * row.prompt_tokens
    start = time.perf_counter()
    try:
        if args.endpoint == "chat":
            messages: Any = [{"role": "user", "content": prompt}]
            if args.stream:
                return await _stream(
                    await api.chat.completions.create(
                        model=model, messages=messages, stream=True, extra_body=extra, **cap
                    ),
                    start,
                    lambda c: c.choices[0].delta.content or "",
                )
            chat = await api.chat.completions.create(model=model, messages=messages, extra_body=extra, **cap)
            return Outcome("ok", time.perf_counter() - start, None, chat.choices[0].finish_reason, _used(chat))
        if args.stream:
            return await _stream(
                await api.completions.create(model=model, prompt=prompt, stream=True, extra_body=extra, **cap),
                start,
                lambda c: c.choices[0].text,
            )
        done = await api.completions.create(model=model, prompt=prompt, extra_body=extra, **cap)
        return Outcome("ok", time.perf_counter() - start, None, done.choices[0].finish_reason, _used(done))
    except openai.RateLimitError as exc:
        return Outcome("rejected", time.perf_counter() - start, retry_after=exc.response.headers.get("retry-after"))
    except openai.OpenAIError:
        return Outcome("error", time.perf_counter() - start)


def _used(reply: Any) -> int:
    return int(reply.usage.completion_tokens) if reply.usage else 0


async def _stream(stream: Any, start: float, text: Any) -> Outcome:
    first, reason, tokens = None, None, 0
    async for chunk in stream:
        if not chunk.choices:
            continue
        if first is None:
            first = time.perf_counter() - start
        tokens += text(chunk).count(PROMPT_WORD.strip())
        reason = chunk.choices[0].finish_reason or reason
    return Outcome("ok", time.perf_counter() - start, first, reason, tokens)


async def replay(rows: list[TraceRow], args: argparse.Namespace) -> Summary:
    api = openai.AsyncOpenAI(
        base_url=f"{args.url.rstrip('/')}/v1", api_key="unused", max_retries=0, timeout=args.timeout
    )
    summary = Summary()
    in_flight = asyncio.Semaphore(args.max_in_flight)
    loop = asyncio.get_running_loop()
    origin = loop.time()
    tasks = []

    async def send(row: TraceRow) -> None:
        async with in_flight:
            summary.outcomes.append(await _one(api, row, args, args.model))

    for row in rows[: args.max_requests]:
        at = origin + row.offset * args.time_scale
        if at - origin > args.duration:
            summary.skipped += 1
            continue
        await asyncio.sleep(max(0.0, at - loop.time()))
        tasks.append(asyncio.create_task(send(row)))
    # Requests still running when the duration ends get until the client timeout, then count as errors.
    await asyncio.gather(*tasks)
    await api.close()
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m modelbudget.testbed.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="base URL of the gate or model server (loopback)")
    p.add_argument("--trace", required=True, help="trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens)")
    p.add_argument("--model", default="model")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--max-tokens", type=int, help="max_tokens each request asks for (default: none)")
    p.add_argument("--reasoning-factor", type=float, default=1.0, help="wanted tokens = generated * F")
    p.add_argument("--time-scale", type=float, default=1.0, help="trace time * this = wall time")
    p.add_argument("--max-requests", type=int, default=1000, help="send at most this many requests")
    p.add_argument("--duration", type=float, default=60.0, help="send for at most this many seconds")
    p.add_argument("--max-in-flight", type=int, default=256)
    p.add_argument("--timeout", type=float, default=120.0, help="per-request client timeout, seconds")
    args = p.parse_args(argv)
    if args.max_requests < 1 or args.duration <= 0 or args.time_scale <= 0 or args.max_in_flight < 1:
        p.error("--max-requests, --duration, --time-scale and --max-in-flight must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    summary = asyncio.run(replay(read_trace(args.trace), args))
    json.dump(summary.as_dict(), sys.stdout)
    print()


if __name__ == "__main__":
    main()
