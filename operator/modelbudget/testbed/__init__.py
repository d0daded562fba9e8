"""Local testbed: fake GPU node pools for kwok and a synthetic vLLM-like model server.

Nothing here is used by the operator itself; it is what the e2e tests, the demo and the
benchmarks run against (see docs/testbed.md and hack/testbed.sh).

- ``serving``: the queueing/serving model of the synthetic server (pure, unit-tested).
- ``demand``: request arrivals from a trace CSV or a piecewise-linear rate curve (pure).
- ``modelserver``: the process that drives both against a real Deployment and exports
  vLLM-compatible Prometheus metrics.
- ``poolcontroller``: reconciles ``KwokNodePool`` objects into kwok fake GPU Nodes.
"""
