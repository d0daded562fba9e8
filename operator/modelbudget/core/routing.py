"""Traffic shares between variants: what is published where users route, and what was served.

The planner gives each variant a weight (integer percent, summing to 100). An HTTPRoute routes by
backend Service, so the weights are carried over to the variants' Services; and since a weight is a
knob that something else enforces, the share each variant actually served is worked out from the
request rates observed per variant and reported next to its weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from modelbudget.api.status import VariantStatus

SHARE_DECIMALS = 1  # tenths of a percent: finer is noise, and would rewrite status every reconcile


def backend_weights(variant_weights: Mapping[str, int], backends: Mapping[str, str]) -> dict[str, int]:
    """Each backend Service's weight from the variants' weights (variant -> Service in ``backends``).

    Variants behind one Service add up. Raises ``ValueError`` naming the variants without a Service:
    their traffic could not be routed, and silently dropping them would change every other share.
    """
    unrouted = sorted(set(variant_weights) - set(backends))
    if unrouted:
        raise ValueError(f"variants without a backend Service cannot be routed: {', '.join(unrouted)}")
    weights: dict[str, int] = {}
    for variant, weight in variant_weights.items():
        service = backends[variant]
        weights[service] = weights.get(service, 0) + weight
    return weights


def served_shares(request_rates: Mapping[str, float | None]) -> dict[str, float] | None:
    """Percent of the requests each variant served, from its observed request rate.

    None when a share cannot be told: a rate missing, not a number or negative (one variant's
    share depends on all the others'), or no requests at all.
    """
    rates = list(request_rates.values())
    if any(r is None or not math.isfinite(r) or r < 0 for r in rates):
        return None
    total = math.fsum(r for r in rates if r is not None)
    if total <= 0:
        return None
    return {name: round(100 * rate / total, SHARE_DECIMALS) for name, rate in request_rates.items() if rate is not None}


def variant_statuses(
    weights: Mapping[str, int | None], request_rates: Mapping[str, float | None]
) -> list[VariantStatus]:
    """``status.variants``: every variant named in either mapping, by name, its published weight
    next to the share it served."""
    names = sorted(set(weights) | set(request_rates))
    # A variant with a weight but no rate read is a missing rate: nobody's share can be told.
    shares = served_shares({name: request_rates.get(name) for name in names}) or {}
    return [VariantStatus(name=name, weight=weights.get(name), served_share=shares.get(name)) for name in names]
