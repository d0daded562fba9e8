"""How fast one replica serves under continuous batching: the latency a token limit implies.

vLLM decodes every running sequence of a replica once per engine step, so all of them gain a
token per inter-token latency ``itl(b) = alpha + beta * b`` with ``b`` the sequences in the batch
(at most ``maxNumSeqs``); a replica then generates ``b / itl(b)`` tokens/s, which grows with ``b``
but ever more slowly.  A prompt costs ``prompt / prefill_rate`` seconds before the first token.
Pure arithmetic: the simulator's request-level engine and the planner both use these numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from modelbudget.api.spec import ModelBudgetSpec, NodePool, Serving, Slo

Tokens = TypeVar("Tokens", float, npt.NDArray[np.float64])
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ServingSpeed:
    max_num_seqs: int
    alpha: float  # seconds per token for a lone sequence
    beta: float  # seconds per token added by each sequence in the batch
    prefill_rate: float  # prompt tokens per second

    def itl(self, batch: float) -> float:
        """Seconds between two tokens of one sequence when ``batch`` sequences run."""
        return self.alpha + self.beta * max(batch, 1.0)

    def decode_seconds(self, tokens: Tokens, batch: float) -> Tokens:
        """Seconds to generate ``tokens`` (the first comes with the prefill, the others one ITL apart)."""
        return np.maximum(tokens - 1.0, 0.0) * self.itl(batch)  # type: ignore[no-any-return]

    def prefill_seconds(self, prompt_tokens: Tokens) -> Tokens:
        return prompt_tokens / self.prefill_rate

    def throughput(self, batch: float) -> float:
        """Generated tokens/s of one replica running ``batch`` sequences."""
        b = min(max(batch, 0.0), float(self.max_num_seqs))
        return b / self.itl(b) if b > 0 else 0.0

    @property
    def capacity(self) -> float:
        """Generated tokens/s of one replica with a full batch."""
        return self.throughput(self.max_num_seqs)

    def batch_for(self, tokens_per_second: float) -> float:
        """The batch one replica runs to generate ``tokens_per_second`` (``b / itl(b) = x``);
        more than ``maxNumSeqs`` when a replica cannot generate that much."""
        x = max(tokens_per_second, 0.0)
        if x * self.beta >= 1.0:
            return float("inf")
        return max(1.0, x * self.alpha / (1.0 - x * self.beta)) if x > 0 else 0.0

    def throughput_many(self, batch: FloatArray) -> FloatArray:
        """``throughput`` of each batch (the same arithmetic, element by element)."""
        b = np.minimum(np.maximum(batch, 0.0), float(self.max_num_seqs))
        with np.errstate(divide="ignore", invalid="ignore"):
            out: FloatArray = np.where(b > 0, b / (self.alpha + self.beta * np.maximum(b, 1.0)), 0.0)
        return out

    def batch_for_many(self, tokens_per_second: FloatArray) -> FloatArray:
        """``batch_for`` of each rate (the same arithmetic, element by element)."""
        x = np.maximum(tokens_per_second, 0.0)
        # fmax: max(1.0, NaN) is 1.0 (an infinite rate with beta 0 gives inf * 0).
        with np.errstate(divide="ignore", invalid="ignore"):
            batch = np.where(x > 0, np.fmax(1.0, x * self.alpha / (1.0 - x * self.beta)), 0.0)
            out: FloatArray = np.where(x * self.beta >= 1.0, np.inf, batch)
        return out

    def latency(self, prompt_tokens: Tokens, tokens: Tokens, batch: float) -> Tokens:
        """End-to-end seconds of one request that is not queued: prefill, then its tokens."""
        return self.prefill_seconds(prompt_tokens) + self.decode_seconds(tokens, batch)


def serving_speed(pool: NodePool) -> ServingSpeed:
    return speed_of(pool.serving, pool.tokens_per_second_per_replica)


def speed_of(serving: Serving, tokens_per_second: float) -> ServingSpeed:
    """The serving parameters; beta by default makes a full batch deliver ``tokens_per_second``
    (the pool's ``tokensPerSecondPerReplica``, so the planner's throughput and the latency agree)."""
    s, alpha, beta = serving, serving.decode_alpha_seconds, serving.decode_beta_seconds
    if beta is None:
        beta = (s.max_num_seqs / tokens_per_second - alpha) / s.max_num_seqs
        if beta < 0:  # even a flat ITL of alpha is too slow for that throughput: the throughput wins
            alpha, beta = s.max_num_seqs / tokens_per_second, 0.0
    return ServingSpeed(s.max_num_seqs, alpha, beta, s.prefill_tokens_per_second)


def largest_limit_within(speed: ServingSpeed, slo: Slo, prompt_tokens: float, batch: float) -> float:
    """The most tokens one request may generate and still meet the SLO at this batch, unqueued:
    its prefill plus its decode within ``latencySeconds``.  ``0`` when even the first token is
    late, or the per-token target cannot be met at this batch."""
    itl, prefill = speed.itl(batch), speed.prefill_seconds(prompt_tokens)
    if slo.time_per_output_token_seconds is not None and itl > slo.time_per_output_token_seconds:
        return 0.0
    if slo.time_to_first_token_seconds is not None and prefill > slo.time_to_first_token_seconds:
        return 0.0
    room = slo.latency_seconds - prefill
    return room / itl + 1.0 if room >= 0 else 0.0


def largest_limit_within_many(speed: ServingSpeed, slo: Slo, prompt_tokens: float, batch: FloatArray) -> FloatArray:
    """``largest_limit_within`` at each batch (the same arithmetic, element by element)."""
    with np.errstate(invalid="ignore"):  # an infinite batch with beta 0: NaN, as in the scalar
        itl = speed.alpha + speed.beta * np.maximum(batch, 1.0)
    prefill = speed.prefill_seconds(prompt_tokens)
    room = slo.latency_seconds - prefill
    late = slo.time_to_first_token_seconds is not None and prefill > slo.time_to_first_token_seconds
    if late or room < 0:
        return np.zeros_like(itl)
    out: FloatArray = room / itl + 1.0
    if slo.time_per_output_token_seconds is not None:
        out = np.where(itl > slo.time_per_output_token_seconds, 0.0, out)
    return out


def batch_within(speed: ServingSpeed, slo: Slo, prompt_tokens: float, tokens: float) -> float:
    """The largest batch (at most ``maxNumSeqs``) at which a request generating ``tokens`` meets
    the SLO, unqueued; ``0`` when not even a lone sequence does."""
    prefill = speed.prefill_seconds(prompt_tokens)
    if slo.time_to_first_token_seconds is not None and prefill > slo.time_to_first_token_seconds:
        return 0.0
    room = slo.latency_seconds - prefill
    if room < 0:
        return 0.0
    itl_max = room / (tokens - 1.0) if tokens > 1.0 else math.inf
    if slo.time_per_output_token_seconds is not None:
        itl_max = min(itl_max, slo.time_per_output_token_seconds)
    if itl_max < speed.itl(1.0):
        return 0.0
    if speed.beta == 0:
        return float(speed.max_num_seqs)
    return min(float(speed.max_num_seqs), (itl_max - speed.alpha) / speed.beta)


def batch_within_many(speed: ServingSpeed, slo: Slo, prompt_tokens: float, tokens: FloatArray) -> FloatArray:
    """``batch_within`` for each number of tokens (the same arithmetic, element by element)."""
    prefill = speed.prefill_seconds(prompt_tokens)
    room = slo.latency_seconds - prefill
    late = slo.time_to_first_token_seconds is not None and prefill > slo.time_to_first_token_seconds
    if late or room < 0:
        return np.zeros_like(tokens)
    with np.errstate(divide="ignore"):
        itl_max = np.where(tokens > 1.0, room / (tokens - 1.0), math.inf)
    if slo.time_per_output_token_seconds is not None:
        itl_max = np.minimum(itl_max, slo.time_per_output_token_seconds)
    if speed.beta == 0:
        batch = np.full_like(itl_max, float(speed.max_num_seqs))
    else:
        batch = np.minimum(float(speed.max_num_seqs), (itl_max - speed.alpha) / speed.beta)
    out: FloatArray = np.where(itl_max < speed.itl(1.0), 0.0, batch)
    return out


def busy_batch(mean_batch: float, z: float) -> float:
    """The batch a replica runs at an upper quantile: sequences in flight on a replica are close to
    Poisson (arrivals are, and continuous batching serves them all at once), so ``b + z * sqrt(b)``."""
    return mean_batch + z * math.sqrt(max(mean_batch, 0.0))


def busy_batch_many(mean_batch: FloatArray, z: float) -> FloatArray:
    """``busy_batch`` of each mean batch."""
    with np.errstate(invalid="ignore"):  # an infinite batch with z 0: NaN, as in the scalar
        out: FloatArray = mean_batch + z * np.sqrt(np.maximum(mean_batch, 0.0))
    return out


def mean_batch_within(batch: float, z: float) -> float:
    """The largest mean batch whose ``busy_batch`` stays within ``batch`` (its inverse)."""
    root = (-z + math.sqrt(z * z + 4.0 * max(batch, 0.0))) / 2.0
    return root * root


def mean_batch_within_many(batch: FloatArray, z: float) -> FloatArray:
    """``mean_batch_within`` of each batch."""
    root = (-z + np.sqrt(z * z + 4.0 * np.maximum(batch, 0.0))) / 2.0
    out: FloatArray = root * root
    return out


def slowest_speed(spec: ModelBudgetSpec) -> ServingSpeed:
    """The pool whose full batch is slowest per sequence: latency promises hold on every pool,
    its own (``nodePools``) and those it draws from (``sharedPools``)."""
    speeds = [serving_speed(p) for p in spec.node_pools]
    speeds += [speed_of(s.serving, s.tokens_per_second_per_replica) for s in spec.shared_pools]
    return max(speeds, key=lambda s: s.itl(s.max_num_seqs))
