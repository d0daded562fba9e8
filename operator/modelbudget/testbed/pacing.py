"""How fast the synthetic server's HTTP API produces tokens: the seam between the HTTP layer and a serving model.

The HTTP layer (``openai_api``) asks a ``Pacer`` for a generation and writes whatever it
yields; it knows nothing of slots or speeds. ``SlotPacer`` paces one replica with the shared
serving speed (``core.serving``): at most ``maxNumSeqs`` sequences, each decoding one token per
``itl(b) = alpha + beta * b`` with ``b`` the sequences running now, and a FIFO queue that gives
up after ``queue_timeout`` (prefill is not paced: the HTTP layer does not pass the prompt size).
``InstantPacer`` yields at once, for benchmarks of the path in front of the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from modelbudget.core.serving import ServingSpeed

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
    def __init__(self, speed: ServingSpeed, queue_timeout: float) -> None:
        if queue_timeout <= 0:
            raise ValueError("queue_timeout must be positive")
        self.speed, self.queue_timeout = speed, queue_timeout
        self.running = 0
        self._slots = asyncio.Semaphore(speed.max_num_seqs)  # waiters are served first come, first served

    async def generate(self, tokens: int) -> AsyncIterator[int]:
        try:
            await asyncio.wait_for(self._slots.acquire(), self.queue_timeout)
        except TimeoutError:
            raise QueueTimeout(f"no batch slot free within {self.queue_timeout:g}s") from None
        self.running += 1
        try:
            decoded = 0
            while decoded < tokens:
                # The batch may change between steps: each step runs at the ITL of the batch now.
                itl = self.speed.itl(self.running)
                n = min(max(1, round(STEP_SECONDS / itl)), tokens - decoded)
                await asyncio.sleep(n * itl)
                decoded += n
                yield n
        finally:
            self.running -= 1
            self._slots.release()
