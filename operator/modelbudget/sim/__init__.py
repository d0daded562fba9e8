"""Trace replay: a simulated cluster (world), what policies see (metrics), the policies, the oracle, scores.

Uses ``modelbudget.core`` and ``modelbudget.api`` only; see docs/benchmark.md.
"""
