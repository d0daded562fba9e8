"""Serving model of the synthetic model server: ready pods, batch slots, one FIFO queue.

Pure and clock-free: the caller passes the time into every call, so tests can drive it tick
by tick without a cluster. The model is small on purpose, yet shows an autoscaler the
signals a vLLM fleet would:

- Each ready pod has ``max_concurrency`` slots (vLLM's running batch). A busy slot decodes
  ``tokens_per_second / max_concurrency`` tokens/s, so a pod delivers its full
  ``tokens_per_second`` only with a full batch, and a lone request is not ``max_concurrency``
  times faster than a batched one (vLLM's per-sequence decode speed stays roughly flat
  until the batch fills).
- One FIFO queue sits in front of all pods, like an ideal load balancer: a request starts
  at the first tick boundary after it arrives, on the ready pod with the most free slots.
  With no ready pod, everything waits, which is how Pending or starting replicas show up.
- The token limit in force when a request starts caps what it generates, ``min(W, L)``;
  the finish reason is ``"length"`` when the limit binds, else ``"stop"``.
- A request that has waited longer than ``queue_timeout`` seconds is dropped.
- When a pod stops being ready, its running requests return to the queue with their
  original arrival time (the client retries), so a lost replica costs latency, not tokens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field


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


@dataclass
class TickResult:
    started: list[tuple[str, Request]] = field(default_factory=list)
    generated: dict[str, float] = field(default_factory=dict)  # tokens decoded per pod
    finished: list[Finished] = field(default_factory=list)
    dropped: int = 0


@dataclass
class _Running:
    request: Request
    target: int
    finished_reason: str
    first_token_at: float
    decoded: float = 0.0


class ServingModel:
    def __init__(self, tokens_per_second: float, max_concurrency: int, queue_timeout: float) -> None:
        if tokens_per_second <= 0 or max_concurrency < 1 or queue_timeout <= 0:
            raise ValueError("tokens_per_second, max_concurrency and queue_timeout must be positive")
        self.max_concurrency = max_concurrency
        self.slot_rate = tokens_per_second / max_concurrency
        self.queue_timeout = queue_timeout
        self.token_limit: int | None = None
        self._queue: deque[Request] = deque()
        self._pods: dict[str, list[_Running]] = {}

    @property
    def ready_pods(self) -> list[str]:
        return sorted(self._pods)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def running(self) -> dict[str, int]:
        return {pod: len(batch) for pod, batch in sorted(self._pods.items())}

    def set_token_limit(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"token limit must be >= 1, got {limit}")
        self.token_limit = limit

    def set_ready_pods(self, pods: Iterable[str]) -> None:
        ready = set(pods)
        retried = [r.request for pod in set(self._pods) - ready for r in self._pods.pop(pod)]
        for pod in ready:
            self._pods.setdefault(pod, [])
        if retried:
            # Retried requests keep their arrival time, hence their place in the FIFO.
            self._queue = deque(sorted([*retried, *self._queue], key=lambda r: r.arrival))

    def submit(self, requests: Iterable[Request]) -> None:
        self._queue.extend(requests)

    def tick(self, now: float, dt: float) -> TickResult:
        """Advance the model over ``[now, now + dt)``: drop, start, then decode."""
        result = TickResult()
        while self._queue and now - self._queue[0].arrival > self.queue_timeout:
            self._queue.popleft()
            result.dropped += 1
        self._start_waiting(now, result)
        self._decode(now, dt, result)
        return result

    def _start_waiting(self, now: float, result: TickResult) -> None:
        while self._queue:
            # Most free slots first, then by name, so placement is deterministic.
            pod = min(self._pods, key=lambda p: (len(self._pods[p]), p), default=None)
            if pod is None or len(self._pods[pod]) >= self.max_concurrency:
                return
            request = self._queue.popleft()
            target = max(1, request.wanted_tokens)
            if self.token_limit is not None:
                target = min(target, self.token_limit)
            self._pods[pod].append(
                _Running(
                    request=request,
                    target=target,
                    finished_reason="length" if target < request.wanted_tokens else "stop",
                    first_token_at=now + 1.0 / self.slot_rate,
                )
            )
            result.started.append((pod, request))

    def _decode(self, now: float, dt: float, result: TickResult) -> None:
        step = self.slot_rate * dt
        for pod, batch in self._pods.items():
            decoded = 0.0
            still_running = []
            for run in batch:
                remaining = run.target - run.decoded
                if step < remaining:
                    run.decoded += step
                    decoded += step
                    still_running.append(run)
                    continue
                decoded += remaining
                finished_at = now + remaining / self.slot_rate
                result.finished.append(
                    Finished(
                        pod=pod,
                        request=run.request,
                        generated_tokens=run.target,
                        finished_reason=run.finished_reason,
                        time_to_first_token=run.first_token_at - run.request.arrival,
                        e2e_latency=finished_at - run.request.arrival,
                    )
                )
            batch[:] = still_running
            if decoded:
                result.generated[pod] = decoded


def spread(total: int, pods: list[str]) -> dict[str, int]:
    """Split ``total`` as evenly as possible over ``pods`` (earlier pods take the remainder)."""
    if not pods:
        return {}
    share, extra = divmod(total, len(pods))
    return {pod: share + (1 if i < extra else 0) for i, pod in enumerate(pods)}
