"""The limits the gate applies, parsed from the published ConfigMap's data, and the holder of the last good value.

Contract with the operator: the ConfigMap's key ``max_tokens`` (its name is configurable, to
match ``spec.tokenLimits.publish.configMap.key``) holds the per-request token limit as a
decimal integer >= 1; the key ``admitted_rps_per_pod`` holds the pod's share of the admitted
request rate as a decimal float >= 0 (absent, empty or ``inf``: no cap). A value that does
not parse is refused as a whole: the last good limits stay in force.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from modelbudget.api.spec import ConfigMapTarget

log = logging.getLogger("modelbudget.gate")

DEFAULT_LIMIT_KEY = ConfigMapTarget().key
ADMITTED_RPS_KEY = "admitted_rps_per_pod"
# Above this a "limit" is a typo or garbage, not a plan: no model generates a billion tokens.
MAX_TOKEN_LIMIT = 1_000_000_000
UNCAPPED_RATE_WORDS = {"", "inf", "+inf", "infinity"}


class BadLimits(ValueError):
    """Published data the gate refuses; the message says which key and why."""


@dataclass(frozen=True)
class Limits:
    max_tokens: int
    admitted_rps: float | None  # requests/s for this pod; None: no cap


def parse_limits(data: Mapping[str, str] | None, limit_key: str = DEFAULT_LIMIT_KEY) -> Limits:
    data = data or {}
    raw_limit = data.get(limit_key)
    if raw_limit is None:
        raise BadLimits(f"key {limit_key!r} is missing")
    try:
        max_tokens = int(raw_limit.strip())
    except ValueError:
        raise BadLimits(f"key {limit_key!r}: {raw_limit!r} is not an integer") from None
    if not 1 <= max_tokens <= MAX_TOKEN_LIMIT:
        raise BadLimits(f"key {limit_key!r}: {max_tokens} is outside [1, {MAX_TOKEN_LIMIT}]")
    return Limits(max_tokens, _parse_rate(data.get(ADMITTED_RPS_KEY)))


def _parse_rate(raw: str | None) -> float | None:
    if raw is None or raw.strip().lower() in UNCAPPED_RATE_WORDS:
        return None
    try:
        rate = float(raw)
    except ValueError:
        raise BadLimits(f"key {ADMITTED_RPS_KEY!r}: {raw!r} is not a number") from None
    if not math.isfinite(rate) or rate < 0:
        raise BadLimits(f"key {ADMITTED_RPS_KEY!r}: {raw!r} must be finite and >= 0")
    return rate


class LimitsHolder:
    """The limits in force: the last good value offered by any source.

    ``offer`` is called on the event loop only (sources in threads hop over with
    ``call_soon_threadsafe``), so no lock is needed. ``on_change`` and ``on_error`` feed the
    metrics; they are called with the new limits and with nothing, respectively.
    """

    def __init__(
        self,
        limit_key: str,
        default: Limits | None,
        on_change: Callable[[Limits], None],
        on_error: Callable[[], None],
    ) -> None:
        self.limit_key = limit_key
        self.current = default
        self._on_change, self._on_error = on_change, on_error
        if default is not None:
            on_change(default)

    def offer(self, data: Mapping[str, str] | None, source: str) -> bool:
        """Apply ``data`` if it parses; refuse, count and log it otherwise. Returns whether it applied."""
        try:
            limits = parse_limits(data, self.limit_key)
        except BadLimits as exc:
            self._on_error()
            kept = f"keeping max_tokens={self.current.max_tokens}" if self.current else "no limit known yet"
            log.error("refused limits from %s: %s; %s", source, exc, kept)
            return False
        if limits != self.current:
            log.info(
                "limits from %s: max_tokens=%d admitted_rps_per_pod=%s", source, limits.max_tokens, limits.admitted_rps
            )
        self.current = limits
        self._on_change(limits)
        return True
