"""Jitted generation: prefill + decode in one ``jax.jit`` around a ``lax.while_loop``.

Shapes are static per bucket: the prompt batch is right-padded to a bucketed length (padding carries
position ``-1``), the output buffer has a bucketed number of steps, and the KV cache a static
capacity. Lengths, limits and sampling settings are arrays, so a new prompt length or a new
``max_new_tokens`` inside the same bucket reuses the compiled program. The cache is donated.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from jaxspec.cache import KVCache
from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import forward

# finish reasons, per row
RUNNING, STOP, LENGTH, CACHE_FULL = 0, 1, 2, 3
FINISH_NAMES = {RUNNING: "running", STOP: "stop", LENGTH: "length", CACHE_FULL: "cache_full"}

MIN_BUCKET = 16


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Smallest size >= n from {minimum·2^k} ∪ {1.5·minimum·2^k}: at most 1.5× padding, few compiles."""
    b = minimum
    while True:
        if n <= b:
            return b
        if n <= b * 3 // 2:
            return b * 3 // 2
        b *= 2


@flax.struct.dataclass
class Sampling:
    """Sampling settings as arrays (changing them never recompiles). temperature 0 = greedy."""

    temperature: jax.Array
    top_k: jax.Array  # 0 = off
    top_p: jax.Array  # 1.0 = off

    @classmethod
    def make(cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> "Sampling":
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


def sample_logits(logits, rng, sampling: Sampling):
    """Next token per row from ``logits [B, V]``: argmax (lowest id on ties) when temperature is 0,
    otherwise temperature + top-k + top-p (nucleus) sampling."""

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        V = logits.shape[-1]
        scaled = logits / jnp.maximum(sampling.temperature, 1e-6)
        sorted_logits, order = lax.top_k(scaled, V)  # descending; ties keep the lower id first
        rank = jnp.arange(V)[None, :]
        k = jnp.where(sampling.top_k > 0, sampling.top_k, V)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = (rank < k) & (mass_before < sampling.top_p)
        masked = jnp.where(keep, sorted_logits, -jnp.inf)
        choice = jax.random.categorical(rng, masked, axis=-1)
        return jnp.take_along_axis(order, choice[:, None], axis=1)[:, 0].astype(jnp.int32)

    return lax.cond(sampling.temperature > 0, draw, greedy)


class _Clock:
    """Records when the prefill of the last generate call finished (split of prefill vs decode time)."""

    def __init__(self):
        self.t: float | None = None

    def mark(self, _first):
        self.t = time.perf_counter()


PREFILL_CLOCK = _Clock()


@flax.struct.dataclass
class GenerationOutput:
    tokens: jax.Array  # [B, N] generated ids, pad_id after a row finished
    num_generated: jax.Array  # [B]
    finish_reason: jax.Array  # [B] RUNNING/STOP/LENGTH/CACHE_FULL
    cache: KVCache


@functools.partial(jax.jit, static_argnames=("cfg", "max_steps", "pad_id", "clock"), donate_argnames=("cache",))
def generate_tokens(
    params,
    prompt_tokens,  # [B, T] right-padded
    prompt_lengths,  # [B]
    cache: KVCache,
    rng,
    max_new_tokens,  # scalar int32, <= max_steps
    stop_ids,  # [K] int32, -1 padded
    sampling: Sampling,
    *,
    cfg: ModelConfig,
    max_steps: int,
    pad_id: int = 0,
    clock: bool = True,
) -> GenerationOutput:
    """Prefill the right-padded prompts into ``cache``, then ``decode_loop`` (``clock``: as there, marking
    the end of the prefill for ``jaxspec.generate``'s timing split)."""
    B, T = prompt_tokens.shape
    positions = jnp.where(jnp.arange(T)[None, :] < prompt_lengths[:, None], jnp.arange(T)[None, :], -1)
    logits, cache, _ = forward(params, cfg, prompt_tokens, positions, cache, last_only=True, empty_cache=True)
    return decode_loop(params, cfg, cache, logits, prompt_lengths, rng, max_new_tokens, stop_ids, sampling,
                       max_steps=max_steps, pad_id=pad_id, clock=clock)


def decode_loop(params, cfg: ModelConfig, cache: KVCache, logits, next_pos, rng, max_new_tokens, stop_ids,
                sampling: Sampling, *, max_steps: int, pad_id: int = 0, clock: bool = True) -> GenerationOutput:
    """Sample the first token from ``logits [B, V]`` (the prefill's last position), then decode until every
    row stops. Traceable: called inside the jitted pipelines (plain generation, compressed caches).

    ``next_pos [B]`` is the RoPE position of the first generated token. A row stops on a stop id (the stop
    token is emitted), after ``max_new_tokens`` tokens, or when its cache is full (``cache_full``: the next
    token would need a slot the cache does not have). ``clock`` (static): mark ``PREFILL_CLOCK`` when the
    first token exists, for callers whose program also prefills; a program without it can be kept in the
    persistent compilation cache.
    """
    B = logits.shape[0]
    capacity = cache.capacity
    first = sample_logits(logits, jax.random.fold_in(rng, 0), sampling)
    if clock:  # a host timestamp when the first token exists (a program with a host callback is never kept
        jax.debug.callback(PREFILL_CLOCK.mark, first)  # in the persistent compilation cache: only where needed)

    def finished(tok, n_out, reason):
        is_stop = (tok[:, None] == stop_ids[None, :]).any(axis=1)
        reason = jnp.where((reason == RUNNING) & is_stop, STOP, reason)
        return jnp.where((reason == RUNNING) & (n_out >= max_new_tokens), LENGTH, reason)

    out = jnp.full((B, max_steps), pad_id, jnp.int32).at[:, 0].set(first)
    n_out = jnp.ones((B,), jnp.int32)
    reason = finished(first, n_out, jnp.full((B,), RUNNING, jnp.int32))

    def cond(state):
        step, _, _, reason, _, _, _ = state
        return (step < max_steps) & (reason == RUNNING).any()

    def body(state):
        step, out, n_out, reason, cur, pos, cache = state
        reason = jnp.where((reason == RUNNING) & (cache.length >= capacity), CACHE_FULL, reason)
        live = reason == RUNNING
        logits, cache, _ = forward(
            params, cfg, cur[:, None], jnp.where(live, pos, -1)[:, None], cache, last_only=True
        )
        nxt = sample_logits(logits, jax.random.fold_in(rng, step), sampling)
        out = out.at[:, step].set(jnp.where(live, nxt, pad_id))
        n_out = n_out + live
        reason = jnp.where(live, finished(nxt, n_out, reason), reason)
        return step + 1, out, n_out, reason, jnp.where(live, nxt, cur), pos + live, cache

    state = (jnp.int32(1), out, n_out, reason, first, next_pos.astype(jnp.int32), cache)
    _, out, n_out, reason, _, _, cache = lax.while_loop(cond, body, state)
    return GenerationOutput(tokens=out, num_generated=n_out, finish_reason=reason, cache=cache)


@dataclasses.dataclass(frozen=True)
class PreparedBatch:
    tokens: jax.Array
    lengths: jax.Array
    max_len: int


def pad_prompts(prompts: list[list[int]], pad_id: int = 0) -> PreparedBatch:
    """Right-pad token lists to a bucketed length."""
    import numpy as np

    max_len = max(len(p) for p in prompts)
    T = bucket(max_len)
    arr = np.full((len(prompts), T), pad_id, np.int32)
    for i, p in enumerate(prompts):
        arr[i, : len(p)] = p
    return PreparedBatch(jnp.asarray(arr), jnp.asarray([len(p) for p in prompts], jnp.int32), max_len)
