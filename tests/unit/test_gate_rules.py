"""The gate's pure rules: the clamp, the admission bucket, the published-limits parser and its holder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelbudget.gate.admission import Admit, Reject, TokenBucket
from modelbudget.gate.clamp import Endpoint, InvalidRequest, clamp
from modelbudget.gate.limits import BadLimits, Limits, LimitsHolder, parse_limits
from modelbudget.gate.sources import MountedDirectory

CHAT, COMPLETIONS = Endpoint.CHAT, Endpoint.COMPLETIONS


def body(**fields: object) -> bytes:
    return json.dumps({"model": "m", **fields}).encode()


class TestClamp:
    @pytest.mark.parametrize(
        ("endpoint", "fields", "requested", "applied", "was_clamped"),
        [
            (CHAT, {"max_tokens": 500}, 500, 100, True),
            (CHAT, {"max_tokens": 50}, 50, 50, False),
            (CHAT, {}, None, 100, True),  # no cap: gets the limit
            (CHAT, {"max_tokens": None}, None, 100, True),
            (CHAT, {"max_completion_tokens": 80, "max_tokens": 500}, 80, 80, False),  # the newer field wins
            (CHAT, {"max_tokens": 10**12}, 10**12, 100, True),
            (COMPLETIONS, {"max_tokens": 500}, 500, 100, True),
            (COMPLETIONS, {}, 16, 16, False),  # the completions API's default, never raised
            (COMPLETIONS, {"max_tokens": None}, None, 100, True),
        ],
    )
    def test_sets_both_caps_to_min_of_requested_and_limit(
        self, endpoint: Endpoint, fields: dict[str, object], requested: int | None, applied: int, was_clamped: bool
    ) -> None:
        out = clamp(endpoint, body(**fields), 100)
        sent = json.loads(out.body)
        assert (out.requested, out.applied, out.clamped) == (requested, applied, was_clamped)
        assert sent["max_tokens"] == applied
        if endpoint is CHAT:
            assert sent["max_completion_tokens"] == applied
        else:
            assert "max_completion_tokens" not in sent  # not a completions field
        assert sent["model"] == "m"

    def test_small_limit_cuts_the_completions_default(self) -> None:
        assert json.loads(clamp(COMPLETIONS, body(), 8).body)["max_tokens"] == 8

    def test_min_tokens_follows_the_cap_down(self) -> None:
        sent = json.loads(clamp(CHAT, body(max_tokens=500, min_tokens=300), 100).body)
        assert sent["min_tokens"] == 100

    def test_keeps_other_fields_and_unicode(self) -> None:
        raw = json.dumps({"messages": [{"role": "user", "content": "héllo ✓"}], "stream": True}).encode()
        sent = json.loads(clamp(CHAT, raw, 5).body)
        assert sent["messages"][0]["content"] == "héllo ✓" and sent["stream"] is True

    @pytest.mark.parametrize(
        ("raw", "param"),
        [
            (b"{bad", None),
            (b"\xff\xfe", None),
            (b"[1, 2]", None),
            (b'"text"', None),
            (body(max_tokens=-1), "max_tokens"),
            (body(max_tokens=0), "max_tokens"),
            (body(max_tokens="100"), "max_tokens"),
            (body(max_tokens=True), "max_tokens"),
            (body(max_tokens=1.5), "max_tokens"),
            (body(max_completion_tokens=0), "max_completion_tokens"),
        ],
    )
    def test_invalid_requests_are_refused_with_the_field(self, raw: bytes, param: str | None) -> None:
        with pytest.raises(InvalidRequest) as err:
            clamp(CHAT, raw, 100)
        assert err.value.param == param


class TestTokenBucket:
    def test_no_rate_admits_everything_at_once(self) -> None:
        bucket = TokenBucket(max_wait=0.5, burst_seconds=1)
        assert all(bucket.take(0.0) == Admit(0.0) for _ in range(1000))

    def test_burst_then_bounded_wait_then_reject(self) -> None:
        bucket = TokenBucket(max_wait=0.5, burst_seconds=1)
        bucket.set_rate(4.0, 0.0)
        assert [bucket.take(0.0) for _ in range(4)] == [Admit(0.0)] * 4  # one second's burst
        assert [bucket.take(0.0) for _ in range(2)] == [Admit(0.25), Admit(0.5)]  # queued within the wait
        rejected = bucket.take(0.0)
        assert rejected == Reject(1)
        assert bucket.take(1.0) == Admit(0.0)  # refilled: the queue drained, the bucket has room again

    def test_long_wait_rounds_retry_after_up(self) -> None:
        bucket = TokenBucket(max_wait=0.1, burst_seconds=1)
        bucket.set_rate(0.2, 0.0)
        assert bucket.take(0.0) == Admit(0.0)
        assert bucket.take(0.0) == Reject(5)

    def test_zero_rate_rejects_and_a_lifted_cap_admits(self) -> None:
        bucket = TokenBucket(max_wait=0.5, burst_seconds=1)
        bucket.set_rate(0.0, 0.0)
        assert isinstance(bucket.take(0.0), Reject)
        bucket.set_rate(None, 1.0)
        assert bucket.take(1.0) == Admit(0.0)

    def test_rejects_nonsense_configuration(self) -> None:
        with pytest.raises(ValueError):
            TokenBucket(max_wait=-1, burst_seconds=1)


class TestPublishedLimits:
    def test_parses_the_contract(self) -> None:
        assert parse_limits({"max_tokens": "1024"}) == Limits(1024, None)
        assert parse_limits({"max_tokens": " 64\n", "admitted_rps_per_pod": "2.5"}) == Limits(64, 2.5)
        assert parse_limits({"max_tokens": "64", "admitted_rps_per_pod": ""}) == Limits(64, None)
        assert parse_limits({"max_tokens": "64", "admitted_rps_per_pod": "+Inf"}) == Limits(64, None)
        assert parse_limits({"limit": "7"}, limit_key="limit") == Limits(7, None)

    @pytest.mark.parametrize(
        "data",
        [
            None,
            {},
            {"max_tokens": "abc"},
            {"max_tokens": "0"},
            {"max_tokens": "-5"},
            {"max_tokens": "1.5"},
            {"max_tokens": "99999999999"},
            {"max_tokens": "64", "admitted_rps_per_pod": "fast"},
            {"max_tokens": "64", "admitted_rps_per_pod": "-1"},
            {"max_tokens": "64", "admitted_rps_per_pod": "nan"},
        ],
    )
    def test_refuses_garbage(self, data: dict[str, str] | None) -> None:
        with pytest.raises(BadLimits):
            parse_limits(data)

    def test_holder_keeps_the_last_good_value_and_counts_refusals(self) -> None:
        applied: list[Limits] = []
        errors: list[None] = []
        holder = LimitsHolder("max_tokens", None, applied.append, lambda: errors.append(None))
        assert holder.current is None
        assert holder.offer({"max_tokens": "100"}, "api")
        assert not holder.offer({"max_tokens": "lots"}, "api")
        assert holder.current == Limits(100, None)
        assert applied == [Limits(100, None)] and len(errors) == 1

    def test_holder_starts_from_the_default(self) -> None:
        applied: list[Limits] = []
        holder = LimitsHolder("max_tokens", Limits(32, None), applied.append, lambda: None)
        assert holder.current == Limits(32, None) and applied == [Limits(32, None)]


def test_mounted_directory_reports_changes_only(tmp_path: Path) -> None:
    mounted = MountedDirectory(tmp_path, ("max_tokens", "admitted_rps_per_pod"))
    assert mounted.changed() == {}
    (tmp_path / "max_tokens").write_text("100")
    assert mounted.changed() == {"max_tokens": "100"}
    assert mounted.changed() is None  # unchanged: a stale mount is not re-applied
    (tmp_path / "admitted_rps_per_pod").write_text("3")
    assert mounted.changed() == {"max_tokens": "100", "admitted_rps_per_pod": "3"}
