"""Prompt compression: jitted stages and the host-level ``compress`` / ``generate``.

Stages (each jitted and compiled once per bucket through ``jaxspec.api.COMPILED``; lengths are arrays, the
method and model configs static). A scoring pass gives the per-token evidence ``[B, T]`` (the method's
``source``), which does not depend on the capacity; ``select_tokens`` then applies the method's ``priority``
and ``keep_top``. A budget sweep (``compress_budgets`` / ``generate_budgets``) scores once per batch and
selects once per capacity.

* ``attention_pass`` (specpc, specprefill): the draft prefills the right-padded prompt into an empty cache
  (an argument: XLA would constant-fold a cache made inside jit; not donated, as no output could reuse it)
  capturing the method's query rows, then greedily writes ``method.steps`` tokens (per row, stopping at a
  stop id, which stays in the lookahead), capturing the query of every token it feeds back. Given
  ``forced`` tokens it feeds those instead of its own (``importance``: another model's attention to the
  same lookahead, for the draft/target correlation diagnostic);
* ``surprisal_pass`` (draft-ppl): the draft's ``-log p(x_j | x_<j)``, prefilled in chunks under a scan so
  that only ``[B, chunk, V]`` logits exist at a time;
* recency, random: no evidence (zeros).

The compressed prompt is then generated from as any prompt is, with positions ``0..C-1``: the target
prefills it into a plain cache through the kv pipeline (``prefill_budgets``: its ``full`` method, or with
``kv=`` that method, for SpecKV reusing the draft's lookahead tokens: SpecKV-PC, no second draft pass) and
``jaxspec.kv.pipeline.decode_sweeps`` decodes (greedy: a sweep's budgets, or in the runner a batch's every
config, as one batch); ``speculative=`` and ``cache_capacity=`` go through ``jaxspec.generate``.
``specprefill`` keeps the original positions: ``generate_at`` prefills the kept tokens at them and decodes
from position ``n``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxspec.api import (COMPILED, PAD_ID, GenerationResult, InputError, Model, check_same_vocabulary,
                         prepare_request)
from jaxspec.cache import KVCache
from jaxspec.generation import FINISH_NAMES, PREFILL_CLOCK, Sampling, bucket, decode_loop, pad_prompts
from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import AttnCapture, forward
from jaxspec.pc.base import AttentionMethod, Method, keep_top
from jaxspec.select import window_scores
from jaxspec.sharding import to_host


@functools.partial(jax.jit, static_argnames=("cfg", "method"))
def attention_pass(params, tokens, lengths, cache, stop_ids, forced=None, forced_len=None, *, cfg: ModelConfig,
                   method: AttentionMethod):
    """Returns ``(score [B, T], look [B, steps], look_len [B])``: the method's evidence (keys ``>= n``
    zero) and the greedy lookahead, or, with ``forced [B, steps]`` / ``forced_len [B]``, those tokens fed
    in its place (row ``b`` feeds ``forced_len[b] - 1`` of them, as a greedy row that wrote
    ``forced_len[b]``). ``cache`` (empty) has capacity ``T + method.steps``."""
    B, T = tokens.shape
    n = lengths
    j = jnp.arange(T)[None]
    prompt = (j < n[:, None])[None, :, None, :]  # [1, B, 1, T]: the prompt keys (slot = position)
    group, queries = method.capture()
    index, weight = method.rows(n)
    logits, cache, attn = window_scores(params, cfg, tokens, jnp.where(j < n[:, None], j, -1), cache, index, weight,
                                        group=group, queries=queries)
    score = method.step_score(attn * prompt)

    def more(tok, count):  # does the row feed back the token it just wrote?
        if forced is not None:
            return count < forced_len
        return ~(tok[:, None] == stop_ids[None]).any(axis=1) & (count < steps)

    steps = method.steps
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32) if forced is None else forced[:, 0]
    look = jnp.zeros((B, steps), jnp.int32).at[:, 0].set(first)
    count = jnp.ones((B,), jnp.int32)  # tokens written = queries captured (the prefill's, then one per feed)
    capture = AttnCapture(1, group=group, queries=queries)

    def body(state):
        step, look, count, live, score, cache = state
        pos = jnp.where(live, n + step - 1, -1)[:, None]
        logits, cache, aux = forward(params, cfg, look[:, step - 1][:, None], pos, cache, last_only=True,
                                     capture=capture, capture_index=jnp.zeros((B, 1), jnp.int32),
                                     capture_weight=live[:, None].astype(jnp.float32))
        s = method.step_score(aux["attn"][..., :T] * prompt)  # slots >= n hold the lookahead: masked
        score = jnp.maximum(score, s) if method.combine == "max" else score + s
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32) if forced is None else forced[:, step]
        look = look.at[:, step].set(jnp.where(live, nxt, 0))
        count = count + live
        return step + 1, look, count, live & more(nxt, count), score, cache

    live = more(first, count)
    _, look, count, _, score, _ = lax.while_loop(lambda s: s[3].any(), body,
                                                 (jnp.int32(1), look, count, live, score, cache))
    if method.combine == "mean":
        score = score / count[:, None]
    return score, look, count


@functools.partial(jax.jit, static_argnames=("cfg", "chunk"))
def surprisal_pass(params, tokens, lengths, cache, *, cfg: ModelConfig, chunk: int):
    """Score token ``j`` by ``-log p(x_j | x_<j)`` under the draft (token 0: 0), prefilling ``chunk`` tokens
    at a time into ``cache`` (empty, capacity ``T``); returns the scores ``[B, T]``."""
    B, T = tokens.shape
    j = jnp.arange(T)[None]
    positions = jnp.where(j < lengths[:, None], j, -1)
    targets = jnp.roll(tokens, -1, axis=1)  # position j predicts token j + 1

    def body(cache, xs):
        tok, pos, tgt = xs
        logits, cache, _ = forward(params, cfg, tok, pos, cache)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return cache, -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]

    def chunks(a):
        return a.reshape(B, T // chunk, chunk).transpose(1, 0, 2)

    _, s = lax.scan(body, cache, (chunks(tokens), chunks(positions), chunks(targets)))
    s = s.transpose(1, 0, 2).reshape(B, T)
    return jnp.concatenate([jnp.zeros((B, 1), s.dtype), s[:, :-1]], axis=1)


@functools.partial(jax.jit, static_argnames=("method",))
def select_tokens(score, lengths, *, method: Method):
    """``keep_top`` of the method's priorities from the evidence ``score [B, T]``: ``(index [B, k], count [B])``."""
    return keep_top(method.priority(score, lengths), lengths, min(method.capacity, score.shape[1]))


@functools.partial(jax.jit, static_argnames=("cfg", "max_steps", "pad_id"), donate_argnames=("cache",))
def generate_at(params, tokens, positions, next_pos, cache, rng, max_new_tokens, stop_ids, sampling, *,
                cfg: ModelConfig, max_steps: int, pad_id: int = 0):
    """Prefill ``tokens`` at the given (ascending, ``-1``-padded) ``positions`` into the empty ``cache``, then
    ``decode_loop`` from ``next_pos``."""
    logits, cache, _ = forward(params, cfg, tokens, positions, cache, last_only=True, empty_cache=True)
    return decode_loop(params, cfg, cache, logits, next_pos, rng, max_new_tokens, stop_ids, sampling,
                       max_steps=max_steps, pad_id=pad_id)


@dataclasses.dataclass
class Compressed:
    """A compressed prompt batch. ``prompts[b]`` are the kept token ids of row ``b``, ``kept[b]`` their
    original positions (ascending); ``compressed[b]`` is False where the prompt fit in the capacity (it is
    returned unchanged). ``lookahead``: the draft's greedy tokens (attention methods), else None.
    ``timings``: ``draft`` (the draft pass and selection; in a budget sweep the one shared pass is counted in
    every result) and ``compile`` seconds."""

    method: Method
    prompts: list[list[int]]
    kept: list[list[int]]
    prompt_lengths: list[int]
    compressed: list[bool]
    lookahead: list[list[int]] | None
    timings: dict[str, float]


def _run(fn, args, static, timings):
    exe, compile_s = COMPILED.get(args, static, fn=fn)
    timings["compile"] += compile_s
    t0 = time.perf_counter()
    out = jax.block_until_ready(exe(*args))
    timings["draft"] += time.perf_counter() - t0
    return out


def _stops(stop_ids) -> jax.Array:
    stops = np.full((max(8, len(stop_ids)),), -1, np.int32)
    stops[: len(stop_ids)] = list(stop_ids)
    return jnp.asarray(stops)


def check_draft(pc: Method, target: Model | None, draft: Model | None) -> None:
    """Refuse a missing draft, one the method cannot run on, and one whose vocabulary differs from the
    target's (the draft reads the target's prompt ids, and its lookahead may go to the target). A draft that
    ``pc`` does not use is allowed: it may serve ``kv=`` or ``speculative=``."""
    if pc.needs_draft and draft is None:
        raise InputError(f"pc method {pc.name!r} needs a draft model (draft=..., CLI --draft)")
    if draft is None:
        return
    pc.check(draft.config)
    if target is None or target is draft:
        return
    check_same_vocabulary(target, draft)


def check_budget_sweep(pcs: list[Method]) -> None:
    """Refuse configs that differ in anything but ``capacity`` (or are of different methods)."""
    if not pcs:
        raise InputError("no pc methods")
    for m in pcs[1:]:
        if type(m) is not type(pcs[0]) or dict(m.params(), capacity=None) != dict(pcs[0].params(), capacity=None):
            raise InputError(f"a budget sweep needs configs of one method differing only in capacity; got {pcs[0]} "
                             f"and {m}")


def _evidence(batch, pc: Method, model: Model | None, stop_ids, timings, lookahead=None):
    """``(score [B, T], lookahead or None)``: what ``pc`` ranks the tokens by, from ``model``'s pass."""
    B, T = batch.tokens.shape
    if pc.source == "attention":
        forced = ()
        if lookahead is not None:
            if max(map(len, lookahead)) > pc.steps or min(map(len, lookahead)) < 1:
                raise InputError(f"{pc.name}: a forced lookahead needs 1 to {pc.steps} tokens per row")
            look = np.zeros((B, pc.steps), np.int32)
            for b, r in enumerate(lookahead):
                look[b, : len(r)] = r
            forced = (jnp.asarray(look), jnp.asarray([len(r) for r in lookahead], jnp.int32))
        args = (model.params, batch.tokens, batch.lengths, KVCache.create(model.config, B, T + pc.steps),
                _stops(stop_ids), *forced)
        score, look, look_len = _run(attention_pass, args, {"cfg": model.config, "method": pc}, timings)
        return score, [r[:m].tolist() for r, m in zip(to_host(look), to_host(look_len))]
    if pc.source == "surprisal":
        args = (model.params, batch.tokens, batch.lengths, KVCache.create(model.config, B, T))
        return _run(surprisal_pass, args, {"cfg": model.config, "chunk": math.gcd(T, 512)}, timings), None
    return jnp.zeros((B, T), jnp.float32), None


def importance(model: Model, prompts: list[list[int]], pc: Method, *, stop_ids=(),
               lookahead: list[list[int]] | None = None) -> tuple[list[np.ndarray], list[list[int]] | None]:
    """The per-token evidence ``pc`` ranks a prompt's tokens by (before its smoothing and selection), computed
    with ``model``: for SpecPC the aggregated attention ``S`` of §2.2 steps 1-3; ``[n]`` floats per row.
    ``lookahead`` (attention methods): tokens fed in place of ``model``'s own greedy ones, so that the
    target's attention to the draft's lookahead can be compared with the draft's. Returns ``(scores,
    lookahead)``."""
    if pc.needs_draft:
        pc.check(model.config)
    batch = pad_prompts(prompts, PAD_ID)
    score, look = _evidence(batch, pc, model, stop_ids, {"draft": 0.0, "compile": 0.0}, lookahead)
    return [row[: len(p)] for row, p in zip(to_host(score), prompts)], look


def compress(prompts: list[list[int]], pc: Method, *, draft: Model | None = None, stop_ids=()) -> Compressed:
    """Compress a batch of token-id prompts with ``pc`` (``draft``: the draft model of methods that need one;
    ``stop_ids`` end its lookahead early). Rows with ``len <= capacity`` come back unchanged; when every row
    does, nothing runs."""
    return compress_budgets(prompts, [pc], draft=draft, stop_ids=stop_ids)[0]


def compress_budgets(prompts: list[list[int]], pcs: list[Method], *, draft: Model | None = None,
                     stop_ids=()) -> list[Compressed]:
    """``compress`` with each config of ``pcs``, which differ only in ``capacity`` (a budget sweep): the
    draft's scoring pass does not depend on the capacity, so it runs once; the selection runs per capacity.
    Each result equals ``compress(prompts, pc, ...)``; a capacity that holds every prompt returns them
    unchanged (no lookahead), as ``compress`` does."""
    check_budget_sweep(pcs)
    check_draft(pcs[0], None, draft)
    lengths = [len(p) for p in prompts]
    flags = [[n > pc.capacity for n in lengths] for pc in pcs]
    shared = {"draft": 0.0, "compile": 0.0}
    if any(map(any, flags)):
        batch = pad_prompts(prompts, PAD_ID)
        score, lookahead = _evidence(batch, pcs[0], draft, stop_ids, shared)
    out = []
    for pc, compressed in zip(pcs, flags):
        if not any(compressed):
            out.append(Compressed(pc, [list(p) for p in prompts], [list(range(n)) for n in lengths], lengths,
                                  compressed, None, {"draft": 0.0, "compile": 0.0}))
            continue
        timings = dict(shared)
        index, count = _run(select_tokens, (score, batch.lengths), {"method": pc}, timings)
        kept = [r[:c].tolist() for r, c in zip(to_host(index), to_host(count))]
        out.append(Compressed(pc, [[p[i] for i in k] for p, k in zip(prompts, kept)], kept, lengths, compressed,
                              lookahead, timings))
    return out


def accounting(c: Compressed, b: int, kept_indices: bool = False) -> dict:
    """Row ``b``: method and parameters, tokens in and out, whether (and why not) it was compressed, the
    positions the target sees, draft seconds (the batch's), the lookahead (its token ids and length), optionally the kept indices."""
    n, m = c.prompt_lengths[b], len(c.prompts[b])
    row = {"method": c.method.name, "params": c.method.params(), "compressed": c.compressed[b], "tokens_in": n,
           "tokens_out": m, "positions": "original" if c.method.keep_positions else "renumbered",
           "draft_seconds": c.timings["draft"], "compile_seconds": c.timings["compile"]}
    if not c.compressed[b]:
        row["note"] = f"prompt ({n} tokens) fits in capacity {c.method.capacity}: unchanged"
    if c.lookahead is not None:
        row["lookahead_tokens"] = len(c.lookahead[b])
        row["lookahead"] = [int(t) for t in c.lookahead[b]]  # ids, as written (the stop id stays)
    if kept_indices:
        row["kept_indices"] = c.kept[b]
    return row


def _generate_at_positions(model: Model, c: Compressed, *, max_new_tokens, sampling, seed, stop_ids):
    """Generate from the kept tokens at their original positions (``keep_positions`` methods)."""
    batch = pad_prompts(c.prompts, PAD_ID)
    B, T = batch.tokens.shape
    positions = np.full((B, T), -1, np.int32)
    for b, k in enumerate(c.kept):
        positions[b, : len(k)] = k
    max_steps = bucket(max_new_tokens)
    args = (model.params, batch.tokens, jnp.asarray(positions), jnp.asarray(c.prompt_lengths, jnp.int32),
            KVCache.create(model.config, B, T + max_steps), jax.random.PRNGKey(seed), jnp.int32(max_new_tokens),
            _stops(stop_ids), sampling)
    exe, compile_s = COMPILED.get(args, {"cfg": model.config, "max_steps": max_steps, "pad_id": PAD_ID},
                                  fn=generate_at)
    PREFILL_CLOCK.t = None
    t0 = time.perf_counter()
    out = jax.block_until_ready(exe(*args))
    t1 = time.perf_counter()
    prefill = (PREFILL_CLOCK.t or t1) - t0
    timings = {"load": model.load_seconds, "compile": compile_s, "prefill": prefill, "decode": t1 - t0 - prefill}
    tokens, n_gen, reasons = to_host(out.tokens), to_host(out.num_generated), to_host(out.finish_reason)
    tps = (int(n_gen.sum()) - B) / timings["decode"] if timings["decode"] > 0 else 0.0
    results = []
    for b in range(B):
        gen = tokens[b, : n_gen[b]].tolist()
        text = model.tokenizer.decode(gen) if model.tokenizer is not None else None
        results.append(GenerationResult(gen, text, FINISH_NAMES[int(reasons[b])], len(c.prompts[b]), dict(timings),
                                        tps))
    return results


def generate(model: Model, prompts, pc: Method, *, draft: Model | None = None, kv=None, speculative=None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_ids=None, chat: bool = False, cache_capacity: int | None = None, kept_indices: bool = False):
    """``jaxspec.generate(..., pc=...)``: compress the prompts with ``pc`` (using ``draft``), then generate
    from the compressed prompts with the other arguments (``kv=``, ``speculative=``, ...). With ``kv=SpecKV``
    after an attention method the draft's lookahead from the compression pass is reused (SpecKV-PC: no second
    draft pass; SpecKV's own ``lookahead_tokens`` then does not apply). Each result carries ``pc``
    accounting; ``timings["pc_draft"]`` is the compression's draft time."""
    req = prepare_request(model, prompts, max_new_tokens, chat, stop_ids, cache_capacity)
    results = _generate(model, req, [pc], draft=draft, kv=kv, speculative=speculative, max_new_tokens=max_new_tokens,
                        sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p), seed=seed,
                        cache_capacity=cache_capacity, kept_indices=kept_indices)[0]
    return results[0] if req.single else results


def generate_budgets(model: Model, prompts, pcs: list[Method], *, draft: Model | None = None, kv=None,
                     speculative=None, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int = 0, stop_ids=None, chat: bool = False,
                     cache_capacity: int | None = None, kept_indices: bool = False) -> list[list[GenerationResult]]:
    """``generate`` over a budget sweep: either ``pcs`` are configs of one method differing only in capacity
    (one draft scoring pass, then per capacity a selection and a target prefill), or ``pcs`` is one config
    and ``kv`` a list of kv configs differing only in capacity (one compression, then for SpecKV-PC one
    target prefill for every kv capacity); greedy, the configs then decode as one batch (``decode_sweeps``).
    Returns the results per config of the sweep, each a list over the prompts."""
    req = prepare_request(model, prompts, max_new_tokens, chat, stop_ids, cache_capacity)
    return _generate(model, req, list(pcs), draft=draft, kv=kv, speculative=speculative,
                     max_new_tokens=max_new_tokens, sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p),
                     seed=seed, cache_capacity=cache_capacity, kept_indices=kept_indices)


def _kv_sweep(kv) -> list:
    """``kv=`` as a list of kv configs (a sweep), ``[None]`` for none."""
    from jaxspec.kv import make_method

    return [make_method(k) for k in kv] if isinstance(kv, (list, tuple)) else [None if kv is None else make_method(kv)]


def _check_combination(model, pcs, kvs, draft, speculative) -> None:
    if len(pcs) > 1 and len(kvs) > 1:
        raise InputError("a budget sweep varies the pc capacity or the kv capacity, not both")
    check_draft(pcs[0], model, draft)
    if pcs[0].keep_positions and (kvs[0] is not None or speculative is not None):
        raise InputError(f"pc method {pcs[0].name!r} keeps the original positions: it combines with neither kv= "
                         "nor speculative=")


def prefill_budgets(model: Model, prompts: list[list[int]], pcs: list[Method], *, draft: Model | None = None,
                    kv=None, max_new_tokens: int = 64, stop_ids=(), kept_indices: bool = False) -> list:
    """A budget sweep (as in ``generate_budgets``) up to its decode: per config, the compressed prompts
    prefilled by ``model`` into a ``jaxspec.kv.pipeline.Compressed`` cache (with ``kv=`` compressed by it;
    SpecKV-PC reuses the draft's lookahead), carrying the pc accounting (``pc``) and ``timings["pc_draft"]``.
    ``jaxspec.kv.pipeline.decode_sweeps`` decodes them, greedily as one batch with any other caches given
    with them. Methods that renumber positions only (``keep_positions`` ones prefill at the original
    positions: ``generate_budgets``)."""
    from jaxspec.kv import Full
    from jaxspec.kv.pipeline import compress_budgets as kv_compress_budgets

    kvs = _kv_sweep(kv)
    _check_combination(model, pcs, kvs, draft, None)
    if pcs[0].keep_positions:
        raise InputError(f"pc method {pcs[0].name!r} keeps the original positions: its prompts are prefilled at "
                         "them by generate_budgets")
    out = []
    for c in compress_budgets(prompts, pcs, draft=draft, stop_ids=stop_ids):
        methods = [Full()] if kvs[0] is None else kvs
        needs = methods[0].needs_draft
        speckv_pc = methods[0].lookahead and needs and c.lookahead is not None
        for cache in kv_compress_budgets(model, c.prompts, methods, draft=draft if needs else None,
                                         lookahead=c.lookahead if speckv_pc else None, max_new_tokens=max_new_tokens,
                                         stop_ids=stop_ids):
            cache.pc = [accounting(c, b, kept_indices) for b in range(len(prompts))]
            cache.timings["pc_draft"] = c.timings["draft"]
            cache.timings["compile"] += c.timings["compile"]
            out.append(cache)
    return out


def _generate(model: Model, req, pcs: list[Method], *, draft, kv, speculative, max_new_tokens, sampling, seed,
              cache_capacity, kept_indices) -> list[list[GenerationResult]]:
    from jaxspec import api
    from jaxspec.kv.pipeline import decode_sweeps

    kvs = _kv_sweep(kv)
    _check_combination(model, pcs, kvs, draft, speculative)
    if kvs[0] is not None and cache_capacity is not None:
        raise InputError("cache_capacity does not apply to kv-compressed generation")
    if speculative is None and cache_capacity is None and not pcs[0].keep_positions:
        caches = prefill_budgets(model, req.ids, pcs, draft=draft, kv=kv, max_new_tokens=max_new_tokens,
                                 stop_ids=req.stop_ids, kept_indices=kept_indices)
        return decode_sweeps(model, [caches], max_new_tokens=max_new_tokens, sampling=Sampling.make(**sampling),
                             seed=seed, stop_ids=req.stop_ids, kept_indices=kept_indices)[0]
    sweep = []
    for c in compress_budgets(req.ids, pcs, draft=draft, stop_ids=req.stop_ids):
        if c.method.keep_positions and any(c.compressed):
            groups = [_generate_at_positions(model, c, max_new_tokens=max_new_tokens,
                                             sampling=Sampling.make(**sampling), seed=seed, stop_ids=req.stop_ids)]
        else:  # speculative (which refuses kv=), a cache_capacity, or an uncompressed keep_positions batch
            groups = [api.generate(model, c.prompts, max_new_tokens=max_new_tokens, seed=seed, stop_ids=req.stop_ids,
                                   cache_capacity=cache_capacity, kv=k, draft=draft if speculative else None,
                                   kept_indices=kept_indices, speculative=speculative, **sampling) for k in kvs]
        for results in groups:
            for b, r in enumerate(results):
                r.pc = accounting(c, b, kept_indices)
                r.timings["pc_draft"] = c.timings["draft"]
                r.timings["compile"] += c.timings["compile"]
            sweep.append(results)
    return sweep
