"""The serving model against hand-computed cases: core's latency arithmetic and sim's engine."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelbudget.api.spec import NodePool, Serving, Slo
from modelbudget.core.serving import (
    ServingSpeed,
    batch_within,
    batch_within_many,
    busy_batch,
    busy_batch_many,
    largest_limit_within,
    largest_limit_within_many,
    mean_batch_within,
    mean_batch_within_many,
    serving_speed,
    speed_of,
)
from modelbudget.sim.serving import Done, Job, ServingEngine

# ITL = 10 ms + 2.5 ms per sequence in the batch; 4 sequences at most; prefill 1000 prompt tokens/s.
SPEED = ServingSpeed(max_num_seqs=4, alpha=0.01, beta=0.0025, prefill_rate=1000.0)


def serve(engine: ServingEngine, until: float, step: float = 0.25, start: float = 0.0) -> list[Done]:
    done, t = [], start
    while t < until - 1e-9:
        t = min(t + step, until)
        done += engine.advance(t).done
    return done


def one_pod(name: str = "a") -> ServingEngine:
    engine = ServingEngine(timeout=60)
    engine.set_pods({name: SPEED}, 0.0)
    return engine


class TestSpeed:
    def test_itl_throughput_and_the_batch_a_rate_needs(self) -> None:
        assert SPEED.itl(1) == pytest.approx(0.0125)
        assert SPEED.itl(4) == pytest.approx(0.02)
        assert SPEED.throughput(4) == pytest.approx(200.0)  # 4 / 0.02
        assert SPEED.capacity == pytest.approx(200.0)
        # b / (0.01 + 0.0025 b) = 100  =>  b = 100 * 0.01 / (1 - 100 * 0.0025) = 4/3
        assert SPEED.batch_for(100.0) == pytest.approx(4 / 3)
        assert SPEED.batch_for(400.0) == float("inf")  # 400 * 0.0025 = 1: no batch gets there
        assert SPEED.prefill_seconds(500.0) == pytest.approx(0.5)
        # 0.5 s prefill (first token), then 99 tokens at 20 ms.
        assert SPEED.latency(500.0, 100.0, 4) == pytest.approx(0.5 + 99 * 0.02)

    def test_beta_defaults_so_a_full_batch_delivers_the_pools_throughput(self) -> None:
        shape = {"name": "p", "gpu_type": "g", "price_per_gpu_hour": 2, "gpus_per_node": 1, "max_nodes": 1}
        pool = NodePool(**shape, tokens_per_second_per_replica=2000)
        speed = serving_speed(pool)
        assert (speed.max_num_seqs, speed.alpha) == (256, 0.02)
        assert speed.capacity == pytest.approx(2000.0)
        # A throughput a flat alpha cannot reach: the throughput wins, the ITL is flat.
        fast = speed_of(Serving(max_num_seqs=2), 1000.0)
        assert (fast.alpha, fast.beta) == (pytest.approx(0.002), 0.0)
        explicit = speed_of(Serving(decode_beta_seconds=0.001), 2000.0)
        assert explicit.beta == 0.001

    def test_largest_limit_within_the_slo(self) -> None:
        # 20 s: 0.5 s prefill, then (20 - 0.5) / 0.02 = 975 more tokens after the first.
        assert largest_limit_within(SPEED, Slo(latency_seconds=20), 500.0, 4) == pytest.approx(976.0)
        # A per-token target the batch misses, or a prefill past the first-token target: nothing fits.
        assert largest_limit_within(SPEED, Slo(latency_seconds=20, time_per_output_token_seconds=0.015), 0.0, 4) == 0
        assert largest_limit_within(SPEED, Slo(latency_seconds=20, time_to_first_token_seconds=0.4), 500.0, 1) == 0
        assert largest_limit_within(SPEED, Slo(latency_seconds=0.2), 500.0, 1) == 0


speeds = st.builds(
    ServingSpeed,
    max_num_seqs=st.integers(1, 512),
    alpha=st.floats(1e-4, 0.1),
    beta=st.one_of(st.just(0.0), st.floats(1e-6, 1e-2)),
    prefill_rate=st.floats(100.0, 1e5),
)
slos = st.builds(
    Slo,
    latency_seconds=st.floats(0.1, 120.0),
    time_to_first_token_seconds=st.none() | st.floats(0.01, 10.0),
    time_per_output_token_seconds=st.none() | st.floats(1e-3, 0.2),
)
values = st.lists(st.floats(0.0, 1e5) | st.sampled_from([0.0, 1.0, np.inf]), min_size=1, max_size=30)


@given(speed=speeds, slo=slos, prompt=st.floats(0.0, 1e4), x=values, z=st.floats(0.0, 5.0))
def test_the_array_forms_give_exactly_the_scalar_numbers(speed, slo, prompt, x, z) -> None:
    # The planner's grid search asks them of a whole grid at once; its decisions must be the ones the
    # scalar arithmetic gives, to the last bit (ties between limits are broken on these numbers).
    a = np.array(x)
    same = np.testing.assert_array_equal  # exact; NaN (inf * 0) equals NaN
    same(speed.batch_for_many(a), [speed.batch_for(v) for v in x])
    same(speed.throughput_many(a), [speed.throughput(v) for v in x])
    same(busy_batch_many(a, z), [busy_batch(v, z) for v in x])
    same(mean_batch_within_many(a, z), [mean_batch_within(v, z) for v in x])
    same(largest_limit_within_many(speed, slo, prompt, a), [largest_limit_within(speed, slo, prompt, v) for v in x])
    same(batch_within_many(speed, slo, prompt, a), [batch_within(speed, slo, prompt, v) for v in x])


class TestEngine:
    def test_one_request_alone(self) -> None:
        engine = one_pod()
        engine.submit([Job(0, arrival=0.3, prompt=100, tokens=150)])
        [done] = serve(engine, 5.0)
        # Prefill 0.1 s gives the first token at 0.4; 149 more at ITL(1) = 12.5 ms.
        assert done.first_token_at == pytest.approx(0.4)
        assert done.finished_at == pytest.approx(0.4 + 149 * 0.0125)

    def test_a_full_batch_then_the_one_that_waited(self) -> None:
        engine = one_pod()
        engine.submit([Job(i, 0.0, 10, 101) for i in range(5)])
        events = engine.advance(0.5)
        assert engine.running() == {"a": 4} and engine.waiting() == 1
        # Four prefill together (10 ms), then decode 100 tokens each at ITL(4) = 20 ms.
        assert events.generated["a"] == pytest.approx(4 * (1 + (0.5 - 0.01) / 0.02))
        done = {d.job.id: d for d in serve(engine, 10.0, start=0.5)}
        for i in range(4):
            assert done[i].finished_at == pytest.approx(0.01 + 100 * 0.02)
        # The fifth starts when the batch empties at 2.01: 10 ms prefill, then alone at 12.5 ms.
        assert done[4].first_token_at == pytest.approx(2.02)
        assert done[4].finished_at == pytest.approx(2.02 + 100 * 0.0125)

    def test_prefill_dominated(self) -> None:
        engine = one_pod()
        engine.submit([Job(0, 0.0, 8000, 2), Job(1, 0.0, 10, 11)])
        done = {d.job.id: d for d in serve(engine, 20.0)}
        # The long prompt holds its slot for 8 s of prefill; both count in the batch meanwhile.
        assert done[0].first_token_at == pytest.approx(8.0)
        assert done[1].first_token_at == pytest.approx(0.01)
        assert done[1].finished_at == pytest.approx(0.01 + 10 * SPEED.itl(2))
        # After the short one is gone the long one decodes its second token alone.
        assert done[0].finished_at == pytest.approx(8.0 + SPEED.itl(1))

    def test_an_interruption_mid_decode_retries_from_scratch(self) -> None:
        engine = one_pod("a")
        engine.submit([Job(0, 0.0, 10, 101)])
        events = engine.advance(0.5)
        assert events.generated["a"] > 1 and not events.done
        engine.set_pods({"b": SPEED}, 0.5)  # a is gone (a spot node taken away), b takes over
        assert engine.running() == {"b": 0} and engine.waiting() == 1
        [done] = serve(engine, 5.0, start=0.5)
        assert done.pod == "b" and done.job.arrival == 0.0
        assert done.first_token_at == pytest.approx(0.51)
        assert done.finished_at == pytest.approx(0.51 + 100 * 0.0125)

    def test_routing_goes_to_the_least_loaded_pod(self) -> None:
        engine = ServingEngine(timeout=60)
        engine.set_pods({"a": SPEED, "b": SPEED}, 0.0)
        engine.submit([Job(i, 0.0, 0, 1000) for i in range(3)])
        engine.advance(0.1)
        assert engine.running() == {"a": 2, "b": 1}

    def test_waiting_past_the_timeout_drops(self) -> None:
        engine = ServingEngine(timeout=1.0)
        engine.set_pods({"a": ServingSpeed(1, 0.01, 0.0, 1000.0)}, 0.0)
        engine.submit([Job(0, 0.0, 0, 1000), Job(1, 0.0, 0, 10)])
        events = engine.advance(1.5)
        assert [j.id for j in events.timed_out] == [1]
        unrouted = ServingEngine(timeout=1.0)
        unrouted.submit([Job(2, 0.0, 0, 10)])
        assert [j.id for j in unrouted.advance(1.5).timed_out] == [2]

    def test_nonsense_is_refused(self) -> None:
        with pytest.raises(ValueError):
            ServingEngine(timeout=0)

    def test_a_last_token_due_below_the_clocks_resolution_finishes(self) -> None:
        # Three days into a replay (t ~ 2.6e5 s, a float step of 5.8e-11 s) a sequence 1.1e-9 tokens
        # short of done (more than the engine's 1e-9 tolerance) is due 1.4e-11 s from now: now + that
        # is now, so the clock never moved and the replay hung (found replaying a week for the HPA
        # policy).  The state is set by hand: reaching it through arrivals takes days of traffic.
        now = 263020.6322655855
        engine = ServingEngine(timeout=60)
        engine.set_pods({"a": SPEED}, now)
        replica = engine._pods["a"]
        job = Job(0, now - 5.0, 0, 400)
        replica.decoding = [(1.1e-9, job.id, job, now - 4.0)]
        replica.running = replica.load = 1
        assert now + 1.1e-9 * SPEED.itl(1) == now
        [done] = engine.advance(now + 1.0).done
        assert (done.job, done.finished_at) == (job, now)
        assert engine.running() == {"a": 0}
