"""The synthetic model server's serving model, demand and metrics, without a cluster."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelbudget.testbed.demand import (
    LognormalSizes,
    RateDemand,
    TraceDemand,
    TraceRow,
    curve_value,
    parse_rate_curve,
    read_trace,
)
from modelbudget.testbed.modelserver import ModelServer, VllmMetrics
from modelbudget.testbed.serving import Request, ServingModel, spread

DT = 0.25


def run(model: ServingModel, until: float, start: float = 0.0) -> list:
    """Tick the model from ``start`` to ``until``; return everything that finished."""
    finished, t = [], start
    while t < until - 1e-9:
        finished += model.tick(t, DT).finished
        t += DT
    return finished


class TestServingModel:
    def test_lone_request_decodes_at_one_slot_rate(self) -> None:
        model = ServingModel(tokens_per_second=400, max_concurrency=4, queue_timeout=60)  # 100 tok/s a slot
        model.set_ready_pods(["p0"])
        model.submit([Request(arrival=0.0, prompt_tokens=10, wanted_tokens=150)])
        [done] = run(model, 5.0)
        assert done.pod == "p0"
        assert done.generated_tokens == 150
        assert done.finished_reason == "stop"
        assert done.e2e_latency == pytest.approx(1.5)
        assert done.time_to_first_token == pytest.approx(0.01)

    def test_token_limit_truncates_and_reports_length(self) -> None:
        model = ServingModel(400, 4, 60)
        model.set_ready_pods(["p0"])
        model.set_token_limit(50)
        model.submit([Request(0.0, 10, 150), Request(0.0, 10, 30)])
        by_wanted = {f.request.wanted_tokens: f for f in run(model, 5.0)}
        assert by_wanted[150].generated_tokens == 50
        assert by_wanted[150].finished_reason == "length"
        assert by_wanted[30].generated_tokens == 30
        assert by_wanted[30].finished_reason == "stop"

    def test_limit_applies_when_a_request_starts_not_when_it_arrives(self) -> None:
        model = ServingModel(100, 1, 60)
        model.set_ready_pods(["p0"])
        model.submit([Request(0.0, 1, 100), Request(0.0, 1, 100)])
        model.tick(0.0, DT)  # the first starts without a limit, the second waits
        model.set_token_limit(20)
        tokens = sorted(f.generated_tokens for f in run(model, 10.0, start=DT))
        assert tokens == [20, 100]

    def test_concurrency_cap_queues_the_rest_fifo(self) -> None:
        model = ServingModel(200, 2, 60)
        model.set_ready_pods(["p0"])
        model.submit([Request(0.0, 1, 100), Request(0.1, 1, 100), Request(0.2, 1, 100)])
        model.tick(0.25, DT)
        assert model.running() == {"p0": 2}
        assert model.waiting == 1
        finished = run(model, 5.0, start=0.5)
        assert [f.request.arrival for f in finished] == [0.0, 0.1, 0.2]
        # The third started only when a slot freed at t=1.25 (100 tokens at 100 tok/s).
        assert finished[2].e2e_latency == pytest.approx(1.25 + 1.0 - 0.2)

    def test_saturated_pod_delivers_its_tokens_per_second(self) -> None:
        model = ServingModel(1000, 8, 600)
        model.set_ready_pods(["p0", "p1"])
        model.submit([Request(0.0, 1, 10_000) for _ in range(40)])
        result = model.tick(0.0, DT)
        assert result.generated == {"p0": pytest.approx(250.0), "p1": pytest.approx(250.0)}
        assert model.running() == {"p0": 8, "p1": 8}
        assert model.waiting == 24

    def test_new_work_goes_to_the_pod_with_most_free_slots(self) -> None:
        model = ServingModel(1000, 4, 60)
        model.set_ready_pods(["a"])
        model.submit([Request(0.0, 1, 10_000)] * 3)
        model.tick(0.0, DT)
        model.set_ready_pods(["a", "b"])
        model.submit([Request(0.25, 1, 10_000)] * 4)
        model.tick(0.25, DT)
        # b fills up to a's level first; the tie then goes to the first name.
        assert model.running() == {"a": 4, "b": 3}

    def test_no_ready_pod_means_waiting_then_drops_after_timeout(self) -> None:
        model = ServingModel(1000, 4, queue_timeout=10)
        model.submit([Request(0.0, 1, 10), Request(5.0, 1, 10)])
        assert model.tick(10.0, DT).dropped == 0
        assert model.waiting == 2
        assert model.tick(10.25, DT).dropped == 1
        assert model.tick(15.25, DT).dropped == 1
        assert model.waiting == 0

    def test_lost_pod_requeues_its_requests_ahead_of_later_arrivals(self) -> None:
        model = ServingModel(100, 1, 60)
        model.set_ready_pods(["a", "b"])
        model.submit([Request(0.0, 1, 1000), Request(0.1, 1, 1000), Request(0.2, 1, 1000)])
        model.tick(0.25, DT)
        assert model.running() == {"a": 1, "b": 1}
        model.set_ready_pods(["a"])
        model.set_ready_pods(["a", "c"])
        model.tick(0.5, DT)
        # c gets the request that b lost (arrival 0.1), not the later one still queued.
        assert model.waiting == 1
        finished = run(model, 30.0, start=0.75)
        assert {f.request.arrival: f.pod for f in finished}[0.1] == "c"

    def test_rejects_nonsense_configuration(self) -> None:
        with pytest.raises(ValueError):
            ServingModel(0, 4, 60)
        with pytest.raises(ValueError):
            ServingModel(100, 4, 60).set_token_limit(0)


def test_spread_is_even_with_remainder_first() -> None:
    assert spread(7, ["a", "b", "c"]) == {"a": 3, "b": 2, "c": 2}
    assert spread(0, ["a"]) == {"a": 0}
    assert spread(5, []) == {}


class TestDemand:
    def test_rate_curve_parsing_and_interpolation(self) -> None:
        points = parse_rate_curve("0:2, 60:10,120:30")
        assert points == [(0.0, 2.0), (60.0, 10.0), (120.0, 30.0)]
        assert curve_value(points, 30) == pytest.approx(6.0)
        assert curve_value(points, 90) == pytest.approx(20.0)
        assert curve_value(points, 500) == 30.0

    @pytest.mark.parametrize("bad", ["5:1", "0:1,0:2", "0:-1", "0:1,10:nan", "zero"])
    def test_rate_curve_rejects(self, bad: str) -> None:
        with pytest.raises(ValueError):
            parse_rate_curve(bad)

    def test_even_arrivals_deliver_the_integral_exactly(self) -> None:
        sizes = LognormalSizes(100, 50, sigma=0)
        demand = RateDemand(parse_rate_curve("0:0,10:20"), 0.0, sizes, 2.0, np.random.default_rng(0), poisson=False)
        reqs = [r for i in range(40) for r in demand.arrivals(i * DT, (i + 1) * DT)]
        assert len(reqs) == 100  # integral of the ramp 0→20 req/s over 10 s
        assert all(r.wanted_tokens == 100 and r.prompt_tokens == 100 for r in reqs)  # 50 x factor 2
        assert all(a.arrival <= b.arrival for a, b in itertools.pairwise(reqs))

    def test_poisson_arrivals_are_seeded(self) -> None:
        def draw(seed: int) -> list[Request]:
            sizes = LognormalSizes(1000, 200, sigma=0.8)
            demand = RateDemand([(0.0, 50.0)], 0.0, sizes, 1.0, np.random.default_rng(seed))
            return [r for i in range(400) for r in demand.arrivals(i * DT, (i + 1) * DT)]

        first = draw(7)
        assert first == draw(7)
        assert first != draw(8)
        assert len(first) == pytest.approx(5000, rel=0.05)  # 50 req/s x 100 s, sd ≈ 1.4 %
        assert np.mean([r.wanted_tokens for r in first]) == pytest.approx(200, rel=0.05)

    def test_trace_replay_scales_time_and_tokens_and_loops(self) -> None:
        rows = [TraceRow(0.0, 10, 5), TraceRow(1.0, 20, 6), TraceRow(3.0, 30, 7)]
        demand = TraceDemand(rows, origin=100.0, time_scale=2.0, reasoning_factor=10, loop=True)
        got = demand.arrivals(100.0, 110.0)
        # Offsets x2 from t=100; the loop period is (span 3 + mean gap 1.5) x 2 = 9 s.
        assert [r.arrival for r in got] == [100.0, 102.0, 106.0, 109.0]
        assert [r.wanted_tokens for r in got] == [50, 60, 70, 50]
        assert demand.rate(100.0) is None
        once = TraceDemand(rows, 0.0, 1.0, 1.0, loop=False)
        assert len(once.arrivals(0.0, 1000.0)) == 3

    def test_read_trace_parses_the_azure_format(self, tmp_path) -> None:
        path = tmp_path / "t.csv"
        path.write_text(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n"
            "2023-11-16 18:17:04.5319600,3180,8\n"
            "2023-11-16 18:17:03.9799600,4808,10\n"
        )
        rows = read_trace(path)
        assert rows[0] == TraceRow(0.0, 4808, 10)
        assert rows[1].offset == pytest.approx(0.552)


def make_server(pods: list[str], rps: float, wanted: int = 100) -> tuple[ModelServer, CollectorRegistry]:
    model = ServingModel(tokens_per_second=1000, max_concurrency=10, queue_timeout=30)
    model.set_ready_pods(pods)
    sizes = LognormalSizes(50, wanted, sigma=0)
    rng = np.random.default_rng(0)
    registry = CollectorRegistry()
    server = ModelServer(
        model,
        RateDemand([(0.0, rps)], 0.0, sizes, 1.0, rng, poisson=False),
        sizes,
        None,
        VllmMetrics(registry, "m", "ns"),
        tick_seconds=DT,
        poll_seconds=1.0,
        reasoning_factor=1.0,
        poisson=False,
        rng=rng,
    )
    return server, registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"model_name": "m", "namespace": "ns", **labels})


class TestModelServerMetrics:
    def test_steady_state_token_rate_matches_demand(self) -> None:
        server, registry = make_server(["p0", "p1"], rps=8)  # 800 tok/s wanted, 2000 available
        for _ in range(120):  # 30 s
            server.step()
        generated = sum(sample(registry, "vllm:generation_tokens_total", pod=p) or 0 for p in ("p0", "p1"))
        # Tokens count as they are decoded; only what the in-flight requests (8 req/s x 1 s latency)
        # have still to decode is missing.
        assert generated == pytest.approx(800 * 30, abs=8 * 100 * 1.5)
        finished = sum(
            sample(registry, "vllm:request_success_total", pod=p, finished_reason="stop") or 0 for p in ("p0", "p1")
        )
        assert finished == server.state()["finished"]
        assert sample(registry, "vllm:request_generation_tokens_bucket", pod="p0", le="100.0") == sample(
            registry, "vllm:request_generation_tokens_count", pod="p0"
        )
        assert sample(registry, "vllm:e2e_request_latency_seconds_count", pod="p0") > 0

    def test_backlog_without_ready_pods_is_exported_on_an_empty_pod_label(self) -> None:
        server, registry = make_server([], rps=4)
        for _ in range(8):
            server.step()
        assert sample(registry, "vllm:num_requests_waiting", pod="") == 8
        assert server.state()["queue"] == 8
        server.model.set_ready_pods(["p0"])
        server.step()
        assert sample(registry, "vllm:num_requests_waiting", pod="") is None
        assert sample(registry, "vllm:num_requests_running", pod="p0") == 9

    def test_a_gone_pod_stops_being_a_series(self) -> None:
        server, registry = make_server(["p0", "p1"], rps=8)
        for _ in range(20):
            server.step()
        assert (sample(registry, "vllm:generation_tokens_total", pod="p1") or 0) > 0
        server.model.set_ready_pods(["p0"])
        server.step()
        assert sample(registry, "vllm:generation_tokens_total", pod="p1") is None
        assert sample(registry, "vllm:num_requests_running", pod="p1") is None

    def test_control_switches_demand_from_now(self) -> None:
        server, _ = make_server(["p0"], rps=1)
        for _ in range(4):
            server.step()
        server.control({"rps": 40})
        assert server.state()["rps"] == 40
        for _ in range(4):
            server.step()
        assert server.state()["arrived"] == 1 + 40
        server.control({"rateCurve": "0:0,10:10"})
        assert server.state()["rps"] == 0
        for bad in (-1, float("nan"), "fast"):
            with pytest.raises(ValueError):
                server.control({"rps": bad})
        with pytest.raises(ValueError):
            server.control({"speed": 3})


class TestBuiltInGate:
    """The server clamps every request itself, so it reports under the gate's names what a gate would."""

    def make(self, pods: list[str], gate_target: str | None) -> tuple[ModelServer, CollectorRegistry]:
        server, _ = make_server(pods, rps=8)
        registry = CollectorRegistry()
        server.metrics = VllmMetrics(registry, "m", "ns", gate_target)
        return server, registry

    def test_it_counts_every_arrival_and_reports_the_limit_each_ready_pod_applies(self) -> None:
        server, registry = self.make(["p0", "p1"], gate_target="llm")
        server.model.set_token_limit(512)
        for _ in range(8):  # 2 s at 8 req/s
            server.step()
        gate = {"namespace": "ns", "target": "llm"}
        assert registry.get_sample_value("modelbudget_gate_arrivals_total", gate) == server.state()["arrived"] == 16
        for pod in ("p0", "p1"):
            assert registry.get_sample_value("modelbudget_gate_token_limit", {**gate, "pod": pod}) == 512
        server.model.set_ready_pods(["p0"])
        server.step()
        assert registry.get_sample_value("modelbudget_gate_token_limit", {**gate, "pod": "p1"}) is None

    def test_with_real_gates_in_front_it_reports_nothing_of_theirs(self) -> None:
        server, registry = self.make(["p0"], gate_target=None)
        server.model.set_token_limit(512)
        server.step()
        assert not [s for m in registry.collect() for s in m.samples if s.name.startswith("modelbudget_gate")]
