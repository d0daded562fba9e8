"""The synthetic model server's serving model, demand and metrics, without a cluster."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelbudget.core.serving import ServingSpeed
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


# 4 sequences a pod; a lone one decodes at 100 tok/s (ITL 10 ms, flat); prefill 1000 tok/s.
SPEED = ServingSpeed(max_num_seqs=4, alpha=0.01, beta=0.0, prefill_rate=1000.0)


class TestServingModel:
    """The testbed's names over the shared engine (whose arithmetic is tested in test_serving)."""

    def test_token_limit_truncates_and_reports_length(self) -> None:
        model = ServingModel(SPEED, 60)
        model.set_ready_pods(["p0"])
        model.set_token_limit(50)
        model.submit([Request(0.0, 10, 150), Request(0.0, 10, 30)])
        by_wanted = {f.request.wanted_tokens: f for f in run(model, 5.0)}
        assert by_wanted[150].generated_tokens == 50
        assert by_wanted[150].finished_reason == "length"
        assert by_wanted[30].generated_tokens == 30
        assert by_wanted[30].finished_reason == "stop"
        # 10 prompt tokens: first token at 10 ms; 29 more at 10 ms each.
        assert by_wanted[30].time_to_first_token == pytest.approx(0.01)
        assert by_wanted[30].e2e_latency == pytest.approx(0.30)
        assert by_wanted[30].time_per_output_token == pytest.approx(0.01)

    def test_limit_applies_when_a_request_arrives(self) -> None:
        model = ServingModel(SPEED, 60)
        model.set_ready_pods(["p0"])
        model.submit([Request(0.0, 1, 100)])
        model.set_token_limit(20)  # published after the first arrived: the gate had let it through
        model.submit([Request(0.1, 1, 100)])
        tokens = sorted(f.generated_tokens for f in run(model, 10.0))
        assert tokens == [20, 100]

    def test_no_ready_pod_means_waiting_then_drops_after_timeout(self) -> None:
        model = ServingModel(SPEED, queue_timeout=10)
        model.submit([Request(0.0, 1, 10), Request(5.0, 1, 10)])
        assert model.tick(9.75, DT).dropped == 0
        assert model.waiting == 2
        assert model.tick(10.0, DT).dropped == 1
        assert model.tick(15.0, DT).dropped == 1
        assert model.waiting == 0

    def test_lost_pod_retries_its_requests_on_another(self) -> None:
        model = ServingModel(SPEED, 60)
        model.set_ready_pods(["a", "b"])
        model.submit([Request(0.0, 1, 1000), Request(0.1, 1, 1000)])
        model.tick(0.0, DT)
        assert model.running() == {"a": 1, "b": 1}
        model.set_ready_pods(["a", "c"])
        assert model.running() == {"a": 1, "c": 0}
        finished = run(model, 30.0, start=DT)
        assert {f.request.arrival: f.pod for f in finished} == {0.0: "a", 0.1: "c"}
        # It started over on c at 0.25 s: 1 ms prefill, then 999 tokens at 10 ms.
        assert {f.request.arrival: f.e2e_latency for f in finished}[0.1] == pytest.approx(0.25 + 0.001 + 9.99 - 0.1)

    def test_rejects_nonsense_configuration(self) -> None:
        with pytest.raises(ValueError):
            ServingModel(SPEED, 0)
        with pytest.raises(ValueError):
            ServingModel(SPEED, 60).set_token_limit(0)


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
    # 10 sequences a pod, each at 100 tok/s whatever the batch: 1000 tok/s a pod.
    model = ServingModel(ServingSpeed(max_num_seqs=10, alpha=0.01, beta=0.0, prefill_rate=10_000.0), queue_timeout=30)
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

    def test_finished_request_counters_exist_at_zero_before_the_first_answer(self) -> None:
        # As vLLM does: a server whose first answers are still decoding has a rate of 0, not no series.
        server, registry = make_server(["p0"], rps=1)
        server.step()
        assert server.state()["finished"] == 0
        for reason in ("stop", "length"):
            assert sample(registry, "vllm:request_success_total", pod="p0", finished_reason=reason) == 0

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
