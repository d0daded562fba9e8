"""Traffic shares between variants: weights carried to Services, served shares from observed rates."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelbudget.api.status import VariantStatus
from modelbudget.core.routing import backend_weights, served_shares, variant_statuses


def test_weights_follow_the_variants_to_their_services() -> None:
    weights = backend_weights({"big": 30, "small": 70}, {"big": "llama-70b", "small": "llama-8b"})
    assert weights == {"llama-70b": 30, "llama-8b": 70}


def test_variants_behind_one_service_add_up() -> None:
    assert backend_weights({"a": 20, "b": 30, "c": 50}, {"a": "svc-1", "b": "svc-1", "c": "svc-2"}) == {
        "svc-1": 50,
        "svc-2": 50,
    }


def test_a_variant_without_a_service_is_named() -> None:
    with pytest.raises(ValueError, match="cannot be routed: small, tiny"):
        backend_weights({"big": 50, "small": 40, "tiny": 10}, {"big": "llama-70b"})


def test_weight_zero_is_carried_not_dropped() -> None:
    assert backend_weights({"big": 0, "small": 100}, {"big": "b", "small": "s"}) == {"b": 0, "s": 100}


def test_served_shares_are_percent_of_the_observed_requests() -> None:
    assert served_shares({"big": 3.0, "small": 9.0}) == {"big": 25.0, "small": 75.0}
    assert served_shares({"big": 0.0, "small": 2.0}) == {"big": 0.0, "small": 100.0}
    assert served_shares({"a": 1.0, "b": 1.0, "c": 1.0}) == {"a": 33.3, "b": 33.3, "c": 33.3}


@pytest.mark.parametrize(
    "rates",
    [
        {"big": None, "small": 4.0},
        {"big": math.nan, "small": 4.0},
        {"big": math.inf, "small": 4.0},
        {"big": -1.0, "small": 4.0},
        {"big": 0.0, "small": 0.0},
        {},
    ],
    ids=["missing", "nan", "inf", "negative", "no-traffic", "no-variants"],
)
def test_served_shares_are_unknown_when_a_rate_cannot_be_trusted(rates: dict[str, float | None]) -> None:
    assert served_shares(rates) is None


@given(st.dictionaries(st.text(min_size=1, max_size=8), st.floats(0, 1e6), min_size=1, max_size=6))
def test_served_shares_sum_to_100_within_rounding(rates: dict[str, float]) -> None:
    shares = served_shares(rates)
    if math.fsum(rates.values()) <= 0:
        assert shares is None
    else:
        assert shares is not None and set(shares) == set(rates)
        assert all(0 <= s <= 100 for s in shares.values())
        assert abs(sum(shares.values()) - 100) <= 0.05 * len(rates) + 1e-9


def test_status_puts_the_weight_next_to_the_served_share() -> None:
    assert variant_statuses({"big": 30, "small": 70}, {"big": 1.0, "small": 3.0}) == [
        VariantStatus(name="big", weight=30, served_share=25.0),
        VariantStatus(name="small", weight=70, served_share=75.0),
    ]


def test_a_variant_whose_rate_was_not_read_leaves_every_share_unknown() -> None:
    assert variant_statuses({"big": 30, "small": 70}, {"small": 3.0}) == [
        VariantStatus(name="big", weight=30, served_share=None),
        VariantStatus(name="small", weight=70, served_share=None),
    ]


def test_status_serialises_as_the_crd_names_it() -> None:
    (status,) = variant_statuses({"big": 100}, {"big": 2.0})
    assert status.model_dump(by_alias=True) == {"name": "big", "weight": 100, "servedShare": 100.0}
