"""Speculative decoding: prefill + (draft, verify, accept, compact) steps in one ``jax.jit`` / ``lax.while_loop``.

Each step, per row: the drafter proposes a tree (a chain is a tree) rooted at the last emitted token; one
target forward verifies every node with tree attention (``jaxspec.tree``); the longest accepted path
(greedy) or the rejection-sampled path (temperature > 0) is kept; its KV entries are compacted into
contiguous cache slots; the accepted drafts plus one bonus token sampled from the target are emitted.
Greedy output is token-identical to plain decoding (``jaxspec.generation``), and speculative sampling
draws from exactly the plain sampling distribution. Rows of a batch draft, accept and stop independently;
stop ids, ``max_new_tokens`` and ``cache_full`` behave as in plain generation.

The KV caches get ``tree_size`` spare slots beyond the requested capacity: a tree is written before it is
verified, and the spare slots keep its window inside the buffer. A row whose cache has fewer than
``tree_size`` free slots verifies a truncated tree, and stops with ``cache_full`` when none is left.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxspec import tree as T_
from jaxspec.api import COMPILED, PAD_ID, GenerationResult, Model, prepare_request
from jaxspec.cache import KVCache
from jaxspec.generation import (CACHE_FULL, FINISH_NAMES, LENGTH, PREFILL_CLOCK, RUNNING, STOP, Sampling,
                                sample_logits)
from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import forward
from jaxspec.sharding import to_host


def sampling_probs(logits, sampling: Sampling):
    """The distribution ``sample_logits`` draws from when temperature > 0 (temperature, top-k, top-p), over
    the last axis of ``logits [..., V]``."""
    V = logits.shape[-1]
    scaled = logits / jnp.maximum(sampling.temperature, 1e-6)
    sorted_logits, order = lax.top_k(scaled, V)
    k = jnp.where(sampling.top_k > 0, sampling.top_k, V)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = (jnp.arange(V) < k) & (jnp.cumsum(probs, axis=-1) - probs < sampling.top_p)
    kept = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    return jnp.take_along_axis(kept, jnp.argsort(order, axis=-1), axis=-1)


def draw(logits, rng, sampling: Sampling):
    """A token per row from ``logits [B, V]`` and the distribution it was drawn from (one-hot when greedy)."""

    def greedy():
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tok, jax.nn.one_hot(tok, logits.shape[-1], dtype=jnp.float32)

    def sample():
        p = sampling_probs(logits, sampling)
        return jax.random.categorical(rng, jnp.log(p), axis=-1).astype(jnp.int32), p

    return lax.cond(sampling.temperature > 0, sample, greedy)


class _Timer:
    """Host-side accumulator of drafting time, fed by debug callbacks from inside the jitted loop."""

    def __init__(self):
        self.total = 0.0
        self._t0 = 0.0

    def start(self, _):
        self._t0 = time.perf_counter()

    def stop(self, _):
        self.total += time.perf_counter() - self._t0


DRAFT_TIMER = _Timer()


class _HostClock:
    """Seconds and row-searches of drafters that draft on the host (e.g. ADED's io_callback), which time
    themselves at no cost: the jitted loop already waits for them."""

    def __init__(self):
        self.total = 0.0
        self.rows = 0

    def add(self, seconds: float, rows: int) -> None:
        self.total += seconds
        self.rows += rows

    def reset(self) -> None:
        self.total, self.rows = 0.0, 0


HOST_DRAFT_TIMER = _HostClock()


@flax.struct.dataclass
class SpeculativeOutput:
    tokens: jax.Array  # [B, max_steps], pad_id past num_generated
    num_generated: jax.Array  # [B]
    finish_reason: jax.Array  # [B]
    accepted_hist: jax.Array  # [B, T]: entry a counts the row's verification steps that accepted a drafts
    target_forwards: jax.Array  # scalar: prefill + verification forwards of the batch
    cache: KVCache  # the target cache (capacity + tree_size slots)


@flax.struct.dataclass
class _State:
    step: jax.Array
    hist: jax.Array  # [B, H] prompt + emitted tokens
    hist_len: jax.Array  # [B]
    n_out: jax.Array  # [B]
    reason: jax.Array  # [B]
    cache: KVCache
    dstate: Any
    accepted_hist: jax.Array


@functools.partial(jax.jit, static_argnames=("cfg", "drafter", "max_steps", "capacity", "pad_id", "profile"))
def speculative_generate_tokens(params, dparams, prompt_tokens, prompt_lengths, rng, max_new_tokens, stop_ids,
                                sampling: Sampling, *, cfg: ModelConfig, drafter, max_steps: int, capacity: int,
                                pad_id: int = 0, profile: bool = False) -> SpeculativeOutput:
    """Prefill the right-padded prompts, then speculative steps until every row stops (see module doc).

    ``capacity`` is the cache size plain generation would use (``cache_full`` triggers at the same token);
    ``max_new_tokens <= max_steps``; ``stop_ids [K]`` is -1 padded. ``profile`` adds host callbacks that
    time the drafter into ``DRAFT_TIMER``.
    """
    B, Tp = prompt_tokens.shape
    T = drafter.tree_size
    idx = jnp.arange(T)
    cache = lax.optimization_barrier(KVCache.create(cfg, B, capacity + T))  # an empty cache, not a constant to fold
    prompt_pos = jnp.where(jnp.arange(Tp)[None, :] < prompt_lengths[:, None], jnp.arange(Tp)[None, :], -1)
    logits, cache, _ = forward(params, cfg, prompt_tokens, prompt_pos, cache, last_only=True, empty_cache=True)
    dstate = drafter.init(dparams, prompt_tokens, prompt_lengths, capacity)
    first = sample_logits(logits, jax.random.fold_in(rng, 0), sampling)
    jax.debug.callback(PREFILL_CLOCK.mark, first)

    hist = jnp.zeros((B, Tp + max_steps + T), jnp.int32).at[:, :Tp].set(jnp.where(prompt_pos >= 0, prompt_tokens, 0))
    hist = hist.at[jnp.arange(B), prompt_lengths].set(first)
    is_stop = (first[:, None] == stop_ids[None, :]).any(axis=1)
    reason = jnp.where(is_stop, STOP, jnp.where(max_new_tokens <= 1, LENGTH, RUNNING)).astype(jnp.int32)
    state = _State(jnp.int32(1), hist, prompt_lengths + 1, jnp.ones((B,), jnp.int32), reason, cache, dstate,
                   jnp.zeros((B, T), jnp.int32))

    def body(s: _State) -> _State:
        base = s.cache.length
        reason = jnp.where((s.reason == RUNNING) & (base >= capacity), CACHE_FULL, s.reason)
        live = reason == RUNNING
        k_draft, k_acc, k_bonus = jax.random.split(jax.random.fold_in(rng, s.step), 3)
        if profile:
            jax.debug.callback(DRAFT_TIMER.start, s.hist_len)
        prop, dstate = drafter.propose(dparams, s.dstate, s.hist, s.hist_len, live, k_draft, sampling)
        if profile:
            jax.debug.callback(DRAFT_TIMER.stop, prop.tree.tokens)
        root = jnp.take_along_axis(s.hist, (s.hist_len - 1)[:, None], axis=1)[:, 0]
        valid = jnp.cumsum(~prop.tree.valid.at[:, 0].set(True), axis=1) == 0
        tree = T_.Tree(prop.tree.tokens.at[:, 0].set(root), prop.tree.parent.at[:, 0].set(-1),
                       valid & live[:, None] & (idx[None, :] < (capacity - base)[:, None]))
        anc = T_.ancestors(tree)
        depth = T_.depths(anc)
        logits, cache, _ = forward(params, cfg, tree.tokens, T_.positions(tree, s.hist_len - 1, depth), s.cache,
                                   mask_info=anc)

        def greedy():
            best = T_.greedy_accept(tree, anc, depth, logits)
            at_best = jnp.take_along_axis(logits, best[:, None, None], axis=1)[:, 0]
            return best, jnp.argmax(at_best, axis=-1).astype(jnp.int32)

        def sample():
            best, residual = T_.sample_accept(tree, sampling_probs(logits, sampling), prop.q,
                                              jax.random.uniform(k_acc, (B, T)))
            return best, jax.random.categorical(k_bonus, jnp.log(residual), axis=-1).astype(jnp.int32)

        best, bonus = lax.cond(sampling.temperature > 0, sample, greedy)
        path = T_.path_to(anc, depth, best)
        n_acc = jnp.take_along_axis(depth, best[:, None], axis=1)[:, 0]
        on_path = jnp.take_along_axis(tree.tokens, jnp.maximum(path, 0), axis=1)
        emitted = jnp.where(idx < n_acc[:, None], jnp.roll(on_path, -1, axis=1), bonus[:, None])
        stops = (emitted[:, :, None] == stop_ids[None, None, :]).any(-1) & (idx <= n_acc[:, None])
        first_stop = jnp.where(stops.any(1), jnp.argmax(stops, axis=1), T)
        keep = jnp.minimum(jnp.minimum(n_acc + 1, first_stop + 1), max_new_tokens - s.n_out)
        keep = jnp.where(live, keep, 0).astype(jnp.int32)

        def write(h, start, e, c):
            return lax.dynamic_update_slice(h, jnp.where(idx < c, e, lax.dynamic_slice(h, (start,), (T,))), (start,))

        hist = jax.vmap(write)(s.hist, s.hist_len, emitted, keep)
        cache = T_.compact(cache, base, path, keep)
        n_out = s.n_out + keep
        reason = jnp.where(live & (first_stop < keep), STOP, reason)
        reason = jnp.where((reason == RUNNING) & (n_out >= max_new_tokens), LENGTH, reason)
        return _State(s.step + 1, hist, s.hist_len + keep, n_out, reason, cache,
                      drafter.update(dparams, dstate, prop, base, keep),
                      s.accepted_hist + jax.nn.one_hot(n_acc, T, dtype=jnp.int32) * live[:, None])

    def cond(s: _State):
        return (s.step <= max_steps) & (s.reason == RUNNING).any()

    s = lax.while_loop(cond, body, state)
    out = jax.vmap(lambda h, start: lax.dynamic_slice(h, (start,), (max_steps,)))(s.hist, prompt_lengths)
    out = jnp.where(jnp.arange(max_steps)[None, :] < s.n_out[:, None], out, pad_id)
    return SpeculativeOutput(out, s.n_out, s.reason, s.accepted_hist, s.step, s.cache)


@dataclasses.dataclass
class SpeculativeResult(GenerationResult):
    """A generation result plus speculation statistics for its row.

    ``accepted_per_step``: ``mean`` accepted draft tokens per verification step and ``histogram[a]``, the
    number of steps that accepted ``a`` drafts (each step also emits one bonus token, so tokens per target
    forward is ``mean + 1``). ``target_forwards``: prefill + the row's verification forwards.
    ``timings["drafting"]``: seconds spent in the drafter for the whole batch (with ``profile=True``, or always
    for drafters that draft on the host, such as ADED).
    """

    accepted_per_step: dict = dataclasses.field(default_factory=dict)
    target_forwards: int = 0


def generate_speculative(
    model: Model,
    prompts: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
    drafter,
    *,
    draft_model: Model | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    chat: bool = False,
    cache_capacity: int | None = None,
    profile: bool = False,
) -> SpeculativeResult | list[SpeculativeResult]:
    """``jaxspec.generate`` with speculative decoding by ``drafter`` (e.g. ``NGram(k=5)``, or
    ``DraftModel(k=4)`` with ``draft_model``). Same arguments and defaults as ``jaxspec.generate``; greedy
    output is identical to it. ``profile`` times the drafter (adds host syncs; off for benchmarks of speed).
    """
    req = prepare_request(model, prompts, max_new_tokens, chat, stop_ids, cache_capacity)
    cfg, tok, batch = model.config, model.tokenizer, req.ids
    if hasattr(drafter, "check"):
        drafter.check(model)
    drafter, dparams = drafter.prepare(draft_model)
    max_steps, capacity, pad_id = req.max_steps, req.capacity, PAD_ID
    args = (model.params, dparams, req.prepared.tokens, req.prepared.lengths, jax.random.PRNGKey(seed),
            jnp.int32(max_new_tokens), req.stops, Sampling.make(temperature, top_k, top_p))
    static = dict(cfg=cfg, drafter=drafter, max_steps=max_steps, capacity=capacity, pad_id=pad_id, profile=profile)
    exe, compile_s = COMPILED.get(args, static, fn=speculative_generate_tokens)
    PREFILL_CLOCK.t = None
    DRAFT_TIMER.total = 0.0
    HOST_DRAFT_TIMER.reset()
    t0 = time.perf_counter()
    out = exe(*args)
    jax.block_until_ready(out.tokens)
    t1 = time.perf_counter()
    prefill_s = (PREFILL_CLOCK.t or t1) - t0
    timings = {"load": model.load_seconds, "compile": compile_s, "prefill": prefill_s, "decode": t1 - t0 - prefill_s}
    if profile:
        timings["drafting"] = DRAFT_TIMER.total
    elif HOST_DRAFT_TIMER.rows:
        timings["drafting"] = HOST_DRAFT_TIMER.total

    tokens, n_gen, reasons = to_host(out.tokens), to_host(out.num_generated), to_host(out.finish_reason)
    acc = to_host(out.accepted_hist)
    tps = (int(n_gen.sum()) - len(batch)) / timings["decode"] if timings["decode"] > 0 else 0.0
    results = []
    for i in range(len(batch)):
        gen = tokens[i, : n_gen[i]].tolist()
        steps = int(acc[i].sum())
        mean = float((acc[i] * np.arange(acc.shape[1])).sum() / steps) if steps else 0.0
        results.append(SpeculativeResult(
            gen, tok.decode(gen) if tok is not None else None, FINISH_NAMES[int(reasons[i])], len(batch[i]),
            dict(timings), tps, accepted_per_step={"mean": mean, "histogram": acc[i].tolist()},
            target_forwards=1 + steps))
    return results[0] if req.single else results
