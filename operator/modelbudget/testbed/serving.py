"""The synthetic model server's fleet: the shared serving engine (``sim.serving``) under the
server's own names -- arriving ``Request`` objects, the published token limit, finish reasons.

The engine is the one the simulator uses (continuous batching per pod, ITL = alpha + beta * batch,
prefill, per-pod FIFO queues, lost pods' requests retried), so the testbed and the simulator
serve the same way.  Pure and clock-free: the caller passes the time into every call.
The token limit in force when a request arrives caps what it generates, ``min(W, L)`` (the gate
clamps at arrival); the finish reason is ``"length"`` when the limit binds, else ``"stop"``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from modelbudget.core.serving import ServingSpeed
from modelbudget.sim.serving import Job, ServingEngine


@dataclass(frozen=True)
class Request:
    arrival: float
    prompt_tokens: int
    wanted_tokens: int  # W: what the request would generate without a limit


@dataclass(frozen=True)
class Finished:
    pod: str
    request: Request
    generated_tokens: int
    finished_reason: str  # "stop" or "length"
    time_to_first_token: float
    e2e_latency: float

    @property
    def time_per_output_token(self) -> float | None:
        """vLLM's TPOT: the decode time over the tokens after the first (None for one token)."""
        if self.generated_tokens < 2:
            return None
        return (self.e2e_latency - self.time_to_first_token) / (self.generated_tokens - 1)


@dataclass
class TickResult:
    started: list[tuple[str, Request]] = field(default_factory=list)
    generated: dict[str, float] = field(default_factory=dict)  # tokens decoded per pod
    finished: list[Finished] = field(default_factory=list)
    dropped: int = 0


class ServingModel:
    def __init__(self, speed: ServingSpeed, queue_timeout: float) -> None:
        self.speed = speed
        self.engine = ServingEngine(queue_timeout)
        self.token_limit: int | None = None
        self._requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self._now = 0.0

    @property
    def ready_pods(self) -> list[str]:
        return self.engine.pods

    @property
    def waiting(self) -> int:
        return self.engine.waiting()

    def running(self) -> dict[str, int]:
        return self.engine.running()

    def set_token_limit(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"token limit must be >= 1, got {limit}")
        self.token_limit = limit

    def set_ready_pods(self, pods: Iterable[str]) -> None:
        self.engine.set_pods(dict.fromkeys(pods, self.speed), self._now)

    def submit(self, requests: Iterable[Request]) -> None:
        jobs = []
        for request in requests:
            i = next(self._ids)
            self._requests[i] = request
            tokens = max(1, request.wanted_tokens)
            if self.token_limit is not None:
                tokens = min(tokens, self.token_limit)
            jobs.append(Job(i, request.arrival, float(request.prompt_tokens), tokens))
        self.engine.submit(jobs)

    def tick(self, now: float, dt: float) -> TickResult:
        """Advance the fleet over ``[now, now + dt)``."""
        events = self.engine.advance(now + dt)
        self._now = now + dt
        result = TickResult(generated=events.generated, dropped=len(events.timed_out))
        result.started = [(pod, self._requests[job.id]) for pod, job in events.started]
        for job in events.timed_out:
            del self._requests[job.id]
        for done in events.done:
            request = self._requests.pop(done.job.id)
            result.finished.append(
                Finished(
                    pod=done.pod,
                    request=request,
                    generated_tokens=done.job.tokens,
                    finished_reason="length" if done.job.tokens < request.wanted_tokens else "stop",
                    time_to_first_token=done.first_token_at - request.arrival,
                    e2e_latency=done.finished_at - request.arrival,
                )
            )
        return result


def spread(total: int, pods: list[str]) -> dict[str, int]:
    """Split ``total`` as evenly as possible over ``pods`` (earlier pods take the remainder)."""
    if not pods:
        return {}
    share, extra = divmod(total, len(pods))
    return {pod: share + (1 if i < extra else 0) for i, pod in enumerate(pods)}
