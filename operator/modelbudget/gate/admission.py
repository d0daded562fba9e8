"""The admission cap: a token bucket with a short bounded wait. Pure: the caller passes the time."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Admit:
    wait: float  # seconds to wait before forwarding (0: at once)


@dataclass(frozen=True)
class Reject:
    retry_after: int  # whole seconds, >= 1, for the Retry-After header


class TokenBucket:
    """``rate`` requests/s with a burst of ``burst_seconds`` worth of them (at least one).

    A request that would find the bucket empty reserves the next token if it comes within
    ``max_wait`` seconds (the bucket goes negative, so waiters queue in arrival order);
    otherwise it is rejected with the time until a token is free. ``rate=None``: no cap.
    """

    def __init__(self, max_wait: float, burst_seconds: float) -> None:
        if max_wait < 0 or burst_seconds <= 0:
            raise ValueError("max_wait must be >= 0 and burst_seconds > 0")
        self.max_wait, self.burst_seconds = max_wait, burst_seconds
        self.rate: float | None = None
        self._tokens = 0.0
        self._at = 0.0

    @property
    def burst(self) -> float:
        return max(1.0, (self.rate or 0.0) * self.burst_seconds)

    def set_rate(self, rate: float | None, now: float) -> None:
        if rate == self.rate:
            return
        if self.rate is None:
            self._tokens = max(1.0, (rate or 0.0) * self.burst_seconds)  # a new cap starts with a full bucket
        else:
            self._refill(now)
        self.rate, self._at = rate, now
        self._tokens = min(self._tokens, self.burst)

    def take(self, now: float) -> Admit | Reject:
        if self.rate is None:
            return Admit(0.0)
        if self.rate == 0:
            return Reject(1)
        self._refill(now)
        if self._tokens >= 1:
            self._tokens -= 1
            return Admit(0.0)
        wait = (1 - self._tokens) / self.rate
        if wait > self.max_wait:
            return Reject(max(1, math.ceil(wait)))
        self._tokens -= 1
        return Admit(wait)

    def _refill(self, now: float) -> None:
        if self.rate:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
