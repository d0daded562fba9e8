"""How fast the synthetic server's HTTP API produces tokens: the seam between the HTTP layer and a serving model.

The HTTP layer (``openai_api``) asks a ``Pacer`` for a generation and writes whatever it
yields; it knows nothing of slots or speeds. ``SlotPacer`` follows the same serving model as
``serving.ServingModel`` for one replica (``max_concurrency`` batch slots, each decoding
``tokens_per_second / max_concurrency`` tokens/s, a FIFO queue that gives up after
``queue_timeout``); ``InstantPacer`` yields at once, for benchmarks of the path in front of
the server. A serving model shared with the simulator plugs in here as another ``Pacer``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

STEP_SECONDS = 0.02  # at most ~50 stream events per second per request, like a decode step


class QueueTimeout(Exception):
    """No batch slot came free within the queue timeout."""


class Pacer(Protocol):
    def generate(self, tokens: int) -> AsyncIterator[int]:
        """Yield the counts of newly decoded tokens as they are decoded, summing to ``tokens``."""
        ...


class InstantPacer:
    async def generate(self, tokens: int) -> AsyncIterator[int]:
        for _ in range(tokens):
            yield 1


class SlotPacer:
    def __init__(self, tokens_per_second: float, max_concurrency: int, queue_timeout: float) -> None:
        if tokens_per_second <= 0 or max_concurrency < 1 or queue_timeout <= 0:
            raise ValueError("tokens_per_second, max_concurrency and queue_timeout must be positive")
        self.slot_rate = tokens_per_second / max_concurrency
        self.queue_timeout = queue_timeout
        self._slots = asyncio.Semaphore(max_concurrency)  # waiters are served first come, first served

    async def generate(self, tokens: int) -> AsyncIterator[int]:
        try:
            await asyncio.wait_for(self._slots.acquire(), self.queue_timeout)
        except TimeoutError:
            raise QueueTimeout(f"no batch slot free within {self.queue_timeout:g}s") from None
        try:
            loop = asyncio.get_running_loop()
            start, decoded = loop.time(), 0
            # The first token comes one slot step after the start, as in ServingModel.
            per_step = max(1, round(self.slot_rate * STEP_SECONDS))
            while decoded < tokens:
                n = min(per_step, tokens - decoded)
                await asyncio.sleep(max(0.0, start + (decoded + n) / self.slot_rate - loop.time()))
                decoded += n
                yield n
        finally:
            self._slots.release()
