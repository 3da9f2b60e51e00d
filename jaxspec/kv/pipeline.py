"""KV-compressed generation: jitted stages and the host-level ``compress`` / ``decode`` / ``generate``.

Stages (each one jitted and compiled once per bucket through ``jaxspec.api.COMPILED``; lengths are
arrays, the method config and the model config are static):

1. lookahead (SpecKV only): greedy ``generate_tokens`` of the draft on the prompt (for ``speckv-oracle``, the
   target's ``decode_compressed`` from the plain prefill of stage 2), ``bucket(lookahead_tokens)`` steps,
   stopping per row at a stop id;
2. ``prefill``: the target prefill on the right-padded prompt (⊕ lookahead) into a donated empty cache,
   capturing the method's window attention (``jaxspec.select.window_scores``); for SpecKV above
   ``prefill_window_size + prefill_vertical_size`` tokens, vertical-slash sparse (``method.sparse_prefill``).
   Where the captured rows are a short suffix and the prefill is dense (``rescore``: SnapKV, PyramidKV, AdaKV,
   SpecKV), the cache comes from the plain prefill of the prompt alone and ``score_suffix`` feeds only those
   rows (the window, SpecKV's lookahead) again to score it: the same scores up to float rounding, and one
   plain prefill serves every such method (and ``full``, StreamingLLM) of a batch. A dense capturing prefill
   of the prompt alone (H2O's: every row) leaves cache and logits as the plain prefill's, bit for bit (the
   capture scores its rows on the side), so it serves as the plain prefill too;
3. ``compress_cache``: pooling, top-k, budget masks, gather into the compressed cache (static capacity
   ``method.slots``), and for SpecKV the re-feed of the final prompt token at position ``n - 1``;
4. ``decode_compressed``: the compressed cache grown by the decode steps, then ``decode_loop``; greedy,
   ``decode_sweeps`` decodes the rows of many compressed configs (a budget sweep's capacities, every kv
   method of an evaluation batch) as one batch (``merge``).

A batch whose prompts all fit in ``capacity`` is not compressed at all (and no lookahead is generated);
in a mixed batch the short rows keep every entry. ``Compressed`` (the output of ``compress``) is not
consumed by ``decode``, so one compressed prompt can be decoded many times. A budget sweep
(``compress_budgets`` / ``generate_budgets``: configs differing only in ``capacity``) runs stages 1 and 2
once, stage 3 once per capacity and, greedy, stage 4 once; ``SharedPrefills`` shares stage 2 between methods.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.api import COMPILED, GenerationResult, InputError, Model, check_same_vocabulary
from jaxspec.cache import KVCache
from jaxspec.generation import FINISH_NAMES, Sampling, bucket, decode_loop, generate_tokens, pad_prompts
from jaxspec.kv.base import Method
from jaxspec.kv.full import Full
from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import AttnCapture, forward
from jaxspec.select import gather, query_rows, window_scores
from jaxspec.sharding import to_host


def grow(cache: KVCache, extra: int) -> KVCache:
    """The same cache with ``extra`` empty slots appended to its capacity."""
    pad = ((0, 0),) * 3 + ((0, extra),)
    return KVCache(k=jnp.pad(cache.k, pad + ((0, 0),)), v=jnp.pad(cache.v, pad + ((0, 0),)),
                   pos=jnp.pad(cache.pos, pad, constant_values=-1), length=cache.length)


@functools.partial(jax.jit, static_argnames=("cfg", "method"), donate_argnames=("cache",))
def prefill(params, tokens, lengths, look, look_len, cache, *, cfg: ModelConfig, method: Method):
    """Prefill ``tokens [B, T]`` (row ``b`` valid up to ``lengths[b]``), followed in each row by its
    ``look_len[b]`` lookahead tokens ``look [B, Ls]`` when ``look`` is given, into the empty ``cache`` of
    capacity ``T + Ls`` (an argument, not a constant: XLA would try to constant-fold the attention to an
    empty cache). Returns ``(last_logits [B, V], cache, scores [L, B, Hkv, T + Ls])``; slot = position."""
    T = tokens.shape[1]
    Ls = 0 if look is None else look.shape[1]
    buf, valid = buffer_tokens(tokens, lengths, look, look_len)
    positions = jnp.where(valid, jnp.arange(buf.shape[1])[None], -1)
    capture = method.capture()
    if capture is None:
        logits, cache, _ = forward(params, cfg, buf, positions, cache, last_only=True, empty_cache=True)
        return logits, cache, jnp.zeros(cache.pos.shape, jnp.float32)
    group, queries = capture
    start, count, num = method.query_rows(lengths, look_len, Ls, T)
    index, weight = query_rows(start, count, num, queries)
    return window_scores(params, cfg, buf, positions, cache, index, weight, group=group, queries=queries,
                         sparse=method.sparse_prefill(lengths, look_len, T + Ls))


def buffer_tokens(tokens, lengths, look, look_len):
    """Row ``b`` of ``tokens [B, T]`` (valid up to ``lengths[b]``) followed by its ``look_len[b]`` lookahead
    tokens ``look [B, Ls]``, as ``(buf [B, T + Ls], valid [B, T + Ls])``, slot = position."""
    B, T = tokens.shape
    n = lengths[:, None]
    if look is None:
        return tokens, jnp.arange(T)[None] < n
    Ls = look.shape[1]
    j = jnp.broadcast_to(jnp.arange(T + Ls)[None], (B, T + Ls))
    from_prompt = jnp.take_along_axis(tokens, jnp.minimum(j, T - 1), axis=1)
    from_look = jnp.take_along_axis(look, jnp.clip(j - n, 0, Ls - 1), axis=1)
    return jnp.where(j < n, from_prompt, from_look), j < n + look_len[:, None]


def rescore(method: Method, lengths, look_len, Ls: int, T: int) -> bool:
    """Whether ``method``'s scores come from ``score_suffix`` on the plain prefill (True) or from its own
    capturing ``prefill`` (False): when it captures a suffix of at most half the buffer (SnapKV and its
    kin, SpecKV: its window and lookahead) and its prefill is dense. H2O captures every row; SpecKV's sparse
    prefill needs the scores inside every layer of the pass that fills the cache."""
    capture = method.capture()
    if capture is None or method.prefills_alone or method.sparse_prefill(lengths, look_len, T + Ls) is not None:
        return False
    return 2 * method.query_rows(lengths, look_len, Ls, T)[2] <= T + Ls


@functools.partial(jax.jit, static_argnames=("cfg", "method"))
def score_suffix(params, cache, tokens, lengths, look, look_len, *, cfg: ModelConfig, method: Method):
    """The scores of ``prefill(..., method=method)`` (``[L, B, Hkv, T]``, slot = position, prompt slots only)
    from the plain prefill's ``cache`` of ``tokens [B, T]``: only the captured query rows ``start + i`` (a
    suffix of prompt ⊕ lookahead, ``method.query_rows``) are fed again, at their positions, against the cache
    entries before ``start``; the math of the one-pass capture, at a fraction of its cost (``num`` rows
    instead of ``T + Ls``), equal to it up to float rounding. ``cache`` is not changed."""
    T = tokens.shape[1]
    Ls = 0 if look is None else look.shape[1]
    group, queries = method.capture()
    start, count, num = method.query_rows(lengths, look_len, Ls, T)
    _, weight = query_rows(start, count, num, queries)
    i = jnp.arange(num)[None]
    qpos = start[:, None] + i
    buf, valid = buffer_tokens(tokens, lengths, look, look_len)
    live = (i < count[:, None]) & (qpos >= 0)
    live &= jnp.take_along_axis(valid, jnp.clip(qpos, 0, T + Ls - 1), axis=1)
    chunk = jnp.take_along_axis(buf, jnp.clip(qpos, 0, T + Ls - 1), axis=1)
    lo = jnp.maximum(start, 0)
    before = grow(cache, num)
    before = before.replace(pos=jnp.where(before.pos >= lo[None, :, None, None], -1, before.pos))
    capture = AttnCapture(num, group=group, queries=queries)
    index = jnp.where(live, i, jnp.argmax(live, axis=1)[:, None])  # weight-0 rows read a live one: no NaN
    _, _, aux = forward(params, cfg, chunk, jnp.where(live, qpos, -1), before, last_only=True, capture=capture,
                        capture_index=index, capture_weight=weight)
    attn = aux["attn"]  # keys: the cache's T + num slots, then the num fed rows
    j = jnp.arange(T)[None]
    src = jnp.where(j < lo[:, None], j, before.capacity + j - start[:, None])  # slot j, or fed row j - start
    src = jnp.clip(src, 0, attn.shape[-1] - 1)
    got = jnp.take_along_axis(attn, jnp.broadcast_to(src[None, :, None], attn.shape[:3] + (T,)), axis=-1)
    return jnp.where(((j < lo[:, None]) | (j - start[:, None] < num))[None, :, None], got, 0.0)


@functools.partial(jax.jit, static_argnames=("cfg", "method", "k"))
def compress_cache(params, cache, scores, logits, tokens, lengths, *, cfg: ModelConfig, method: Method, k: int):
    """Select and gather ``k`` slots per (layer, row, kv head); for lookahead methods re-feed the final
    prompt token at ``n - 1``. Returns ``(compressed cache, logits [B, V] of the first new token)``."""
    index, keep = method.keep(scores, lengths, k)
    small = gather(cache, index, keep)
    if method.lookahead:
        last = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)
        logits, small, _ = forward(params, cfg, last, (lengths - 1)[:, None], grow(small, 1), last_only=True)
    return small, logits


@functools.partial(jax.jit, static_argnames=("cfg", "max_steps", "pad_id"))
def decode_compressed(params, cache, logits, next_pos, rng, max_new_tokens, stop_ids, sampling, *, cfg: ModelConfig,
           max_steps: int, pad_id: int = 0):
    """``decode_loop`` on a copy of ``cache`` grown by ``max_steps`` slots (``cache`` stays usable)."""
    return decode_loop(params, cfg, grow(cache, max_steps), logits, next_pos, rng, max_new_tokens, stop_ids,
                       sampling, max_steps=max_steps, pad_id=pad_id, clock=False)  # decode only: timed whole


@dataclasses.dataclass
class Compressed:
    """A compressed prompt batch, ready to decode (any number of times).

    ``cache`` holds the kept prompt entries (original positions; for SpecKV also the re-fed final prompt
    token); ``logits [B, V]`` are the first new token's; ``next_pos [B]`` its position (= prompt length).
    ``compressed[b]`` is False where row ``b``'s prompt fits in the capacity (every entry kept).
    ``pc``: per row, the prompt-compression accounting of prompts compressed before this cache was made
    (``jaxspec.pc.pipeline.prefill_budgets``); their results carry it, and no kv accounting where ``method``
    is ``full`` (nothing of the compressed prompt's cache was dropped).
    """

    method: Method
    cache: KVCache
    logits: jax.Array
    next_pos: jax.Array
    prompt_lengths: list[int]
    compressed: list[bool]
    lookahead: list[list[int]] | None
    timings: dict[str, float]
    pc: list[dict] | None = None


def _stops(stop_ids) -> jax.Array:
    stops = np.full((max(8, len(stop_ids)),), -1, np.int32)
    stops[: len(stop_ids)] = list(stop_ids)
    return jnp.asarray(stops)


def _run(fn, args, static, timings, name):
    """Compile (once per shapes/static config) and run ``fn``; add the run time to ``timings[name]``."""
    exe, compile_s = COMPILED.get(args, static, fn=fn)
    timings["compile"] = timings.get("compile", 0.0) + compile_s
    t0 = time.perf_counter()
    out = jax.block_until_ready(exe(*args))
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
    return out


def check_draft(method: Method, target: Model, draft: Model | None) -> None:
    """Refuse a draft-needing method without a draft, a draft for a method that has no use for one, and a
    draft whose vocabulary differs from the target's (the lookahead ids go to the target as they are)."""
    if method.needs_draft and draft is None:
        raise InputError(f"kv method {method.name!r} needs a draft model (draft=..., CLI --draft)")
    if draft is None:
        return
    if not method.needs_draft:
        raise InputError(f"kv method {method.name!r} does not use a draft model")
    check_same_vocabulary(target, draft)


def compress(target: Model, prompts: list[list[int]], kv: Method, *, draft: Model | None = None,
             max_new_tokens: int = 64, stop_ids=(), pad_id: int = 0,
             lookahead: list[list[int]] | None = None) -> Compressed:
    """Compress the KV cache of a batch of token-id prompts with ``kv``. ``max_new_tokens`` is SpecKV's
    default lookahead length; ``stop_ids`` end the lookahead early (the stop id stays in it). ``lookahead``:
    per-row lookahead tokens already written by the draft (SpecKV-PC reuses SpecPC's): no draft pass."""
    return compress_budgets(target, prompts, [kv], draft=draft, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                            pad_id=pad_id, lookahead=lookahead)[0]


class SharedPrefills(collections.OrderedDict):
    """Target prefills shared between the kv methods run on one batch (``compress_budgets(shared=...)``): the
    ``size`` most recently used are kept, since each holds a cache of the whole prompt (two serve methods
    that run one after another: the plain prefill, and the scores of SnapKV, PyramidKV and AdaKV or of
    H2O's own prefill, which is the plain one too when H2O runs first)."""

    def __init__(self, size: int = 2):
        super().__init__()
        self.size = size

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


def check_budget_sweep(methods: list[Method]) -> None:
    """Refuse configs that differ in anything but ``capacity`` (or are of different methods)."""
    if not methods:
        raise InputError("no kv methods")
    first = methods[0]
    for m in methods[1:]:
        if type(m) is not type(first) or dict(m.params(), capacity=None) != dict(first.params(), capacity=None):
            raise InputError(f"a budget sweep needs configs of one method differing only in capacity; got {first} "
                             f"and {m}")


def prefill_key(method: Method, lengths, look_len, Ls: int, T: int):
    """Everything ``prefill`` reads from ``method`` on this batch (``capture()``, ``query_rows()``,
    ``sparse_prefill()``, evaluated on the concrete lengths), as a hashable value: configs with equal keys
    run the same prefill program on the same inputs, so one prefill serves them all."""
    def host(x):
        return tuple(to_host(x).ravel().tolist()) if isinstance(x, (jax.Array, np.ndarray)) else x

    capture = method.capture()
    if capture is None:
        return None
    sparse = method.sparse_prefill(lengths, look_len, T + Ls)
    return (capture, tuple(map(host, method.query_rows(lengths, look_len, Ls, T))),
            None if sparse is None else tuple(map(host, sparse)))


def compress_budgets(target: Model, prompts: list[list[int]], methods: list[Method], *,
                     draft: Model | None = None, max_new_tokens: int = 64, stop_ids=(), pad_id: int = 0,
                     lookahead: list[list[int]] | None = None, shared: dict | None = None) -> list[Compressed]:
    """``compress`` with each config of ``methods``, which differ only in ``capacity`` (a budget sweep): the
    draft lookahead runs once, the target prefill with its attention capture once per ``prefill_key`` (once
    for the whole sweep, but for SpecKV's sparse prefill when a row is scored under some capacities only),
    ``compress_cache`` once per capacity; it does not consume the prefilled cache. Each result equals
    ``compress(target, prompts, m, ...)``. A capacity that holds every prompt is not compressed (as in
    ``compress``); those share one plain prefill without lookahead. The shared stages' seconds appear in
    full in the ``timings`` of every result that used them.

    ``shared``: a mapping the caller keeps across calls (e.g. a ``SharedPrefills``) to share target prefills
    between *methods* too: a prefill is reused wherever the prompts, the lookahead tokens and the
    ``prefill_key`` are equal (SnapKV, PyramidKV and AdaKV with equal windows share their scores), and the
    plain prefill wherever the prompts are (``full``, StreamingLLM, and every method scored by
    ``score_suffix``); a dense capturing prefill without lookahead (H2O's) is stored as the plain prefill as
    well, when none is there yet. Results are the same as without it."""
    check_budget_sweep(methods)
    check_draft(methods[0], target, draft)
    cfg = target.config
    lengths = [len(p) for p in prompts]
    batch = pad_prompts(prompts, pad_id)
    T = batch.tokens.shape[1]
    flags = [[not isinstance(m, Full) and n > m.capacity for n in lengths] for m in methods]
    squeezed = [m for m, f in zip(methods, flags) if any(f)]
    scored = {}  # (prompts, lookahead, prefill key) -> (logits, cache, scores, timings), this call's
    shared = {} if shared is None else shared
    inputs = (tuple(map(tuple, prompts)), pad_id)

    def prefilled(key, method, look, look_len, Ls):
        """The target prefill of ``key`` (run once per key): ``(logits, cache, scores, its timings)``."""
        if key not in scored:
            if key not in shared and key[2] is not None and rescore(method, batch.lengths, look_len, Ls, T):
                logits, cache, _, plain = prefilled((inputs, None, None), Full(), None, None, 0)
                t = dict(plain)
                args = (target.params, cache, batch.tokens, batch.lengths, look, look_len)
                shared[key] = (logits, cache, _run(score_suffix, args, {"cfg": cfg, "method": method}, t, "prefill"),
                               t)
            elif key not in shared:
                t = {}
                empty = KVCache.create(cfg, len(prompts), T + Ls)
                shared[key] = (*_run(prefill, (target.params, batch.tokens, batch.lengths, look, look_len, empty),
                                     {"cfg": cfg, "method": method}, t, "prefill"), t)
                plain = (inputs, None, None)
                dense = method.sparse_prefill(batch.lengths, look_len, T + Ls) is None
                if key != plain and look is None and dense and plain not in shared:
                    shared[plain] = shared[key]  # a dense capture of the prompt alone fills the plain cache
            scored[key] = shared[key]
        return scored[key]

    keys = [None] * len(methods)
    lead = {"draft": 0.0}  # stages before the prefill (the draft lookahead)
    if squeezed:
        method = squeezed[0]
        look = look_len = None
        if method.lookahead and lookahead is not None:
            look = np.full((len(prompts), bucket(max(map(len, lookahead)))), pad_id, np.int32)
            for b, r in enumerate(lookahead):
                look[b, : len(r)] = r
            look, look_len = jnp.asarray(look), jnp.asarray([len(r) for r in lookahead], jnp.int32)
        elif method.lookahead:
            steps = method.lookahead_tokens or max_new_tokens
            Ls = bucket(steps)
            if draft is None:  # the target's own answer (speckv-oracle): greedy from the shared plain prefill,
                # whose seconds count in "draft" too (as generating the answer from scratch would)
                logits, cache, _, plain = prefilled((inputs, None, None), Full(), None, None, 0)
                args = (target.params, cache, logits, batch.lengths, jax.random.PRNGKey(0), jnp.int32(steps),
                        _stops(stop_ids), Sampling.make(0.0))
                out = _run(decode_compressed, args, {"cfg": cfg, "max_steps": Ls, "pad_id": pad_id}, lead, "draft")
                lead["draft"] += plain["prefill"]
            else:
                args = (draft.params, batch.tokens, batch.lengths, KVCache.create(draft.config, len(prompts), T + Ls),
                        jax.random.PRNGKey(0), jnp.int32(steps), _stops(stop_ids), Sampling.make(0.0))
                out = _run(generate_tokens, args, {"cfg": draft.config, "max_steps": Ls, "pad_id": pad_id,
                                                   "clock": False}, lead, "draft")
            look, look_len = out.tokens, out.num_generated
            lookahead = [r[:m].tolist() for r, m in zip(to_host(look), to_host(look_len))]
        Ls = 0 if look is None else look.shape[1]
        look_key = None if look is None else (Ls, tuple(map(tuple, lookahead)))  # Ls: the buffer's capacity
        for i, (m, f) in enumerate(zip(methods, flags)):
            if any(f):
                keys[i] = (inputs, look_key, prefill_key(m, batch.lengths, look_len, Ls, T))
                prefilled(keys[i], m, look, look_len, Ls)
    out = []
    load = {"load": target.load_seconds + (draft.load_seconds if draft is not None else 0.0)}
    for m, f, key in zip(methods, flags, keys):
        if not any(f):  # every prompt fits: the plain prefill (the key of a method without capture)
            logits, cache, _, t = prefilled((inputs, None, None), Full(), None, None, 0)
            out.append(Compressed(m, cache, logits, batch.lengths, lengths, f, None,
                                  dict(t, draft=0.0, score=0.0, **load)))
            continue
        logits, cache, scores, t = scored[key]
        timings = {**lead, **t, "compile": lead.get("compile", 0.0) + t["compile"], **load}
        args = (target.params, cache, scores, logits, batch.tokens, batch.lengths)
        small, first = _run(compress_cache, args, {"cfg": cfg, "method": m, "k": m.slots(T, cfg.num_kv_heads)},
                            timings, "score")
        out.append(Compressed(m, small, first, batch.lengths, lengths, f, lookahead if m.lookahead else None,
                              timings))
    return out


def accounting(c: Compressed, cfg: ModelConfig, kept_indices: bool = False) -> list[dict]:
    """Per row: method and parameters, whether it was compressed, entries kept per layer (and per kv head
    where heads differ), KV bytes kept vs the full prompt's, the lookahead's token ids (SpecKV: what the draft,
    or for the oracle the target, wrote) and optionally the kept positions
    ``kept_indices[layer][kv_head]`` (sorted). Counts are taken at decode start, so SpecKV's include the
    re-fed final prompt token (``capacity + 1``)."""
    pos = to_host(c.cache.pos)  # [L, B, H, K]
    per_entry = 2 * cfg.head_dim * np.dtype(c.cache.k.dtype).itemsize  # K and V of one (layer, head, slot)
    L, _, H, K = pos.shape
    rows = []
    for b, n in enumerate(c.prompt_lengths):
        kept = (pos[:, b] >= 0).sum(-1)  # [L, H]
        row = {
            "method": c.method.name,
            "params": c.method.params(),
            "compressed": c.compressed[b],
            "prompt_tokens": n,
            "kept_per_layer": [int(x[0]) if (x == x[0]).all() else float(x.mean()) for x in kept],
            "kv_bytes_kept": int(kept.sum()) * per_entry,
            "kv_bytes_full": n * L * H * per_entry,
            "kv_bytes_allocated": K * L * H * per_entry,
        }
        if not (kept == kept[:, :1]).all():
            row["kept_per_head"] = kept.tolist()
        if c.lookahead is not None:
            row["lookahead_tokens"] = len(c.lookahead[b])
            row["lookahead"] = [int(t) for t in c.lookahead[b]]  # ids, as written (the stop id stays)
        if kept_indices:
            row["kept_indices"] = [[np.sort(p[p >= 0]).tolist() for p in layer] for layer in pos[:, b]]
        rows.append(row)
    return rows


def decode(target: Model, c: Compressed, *, max_new_tokens: int = 64, sampling: Sampling | None = None,
           seed: int = 0, stop_ids=(), pad_id: int = 0):
    """Decode a ``Compressed`` batch (which stays usable). Returns ``(GenerationOutput, decode seconds,
    compile seconds)``."""
    timings: dict[str, float] = {}
    args = (target.params, c.cache, c.logits, c.next_pos, jax.random.PRNGKey(seed), jnp.int32(max_new_tokens),
            _stops(stop_ids), sampling if sampling is not None else Sampling.make(0.0))
    out = _run(decode_compressed, args, {"cfg": target.config, "max_steps": bucket(max_new_tokens),
                                         "pad_id": pad_id}, timings, "decode")
    return out, timings["decode"], timings["compile"]


def generate(target: Model, prompts: list[list[int]], kv: Method, *, draft: Model | None = None,
             max_new_tokens: int = 64, sampling: Sampling | None = None, seed: int = 0, stop_ids=(),
             kept_indices: bool = False, lookahead: list[list[int]] | None = None) -> list[GenerationResult]:
    """``compress`` then ``decode``; each result carries ``kv`` accounting and timings split into
    draft, prefill, score (selection + gather + re-feed) and decode."""
    return generate_budgets(target, prompts, [kv], draft=draft, max_new_tokens=max_new_tokens, sampling=sampling,
                            seed=seed, stop_ids=stop_ids, kept_indices=kept_indices, lookahead=lookahead)[0]


def merge(cs: list[Compressed]) -> Compressed:
    """The rows of ``cs`` (compressed with any configs: a budget sweep, several methods) as one batch: each
    cache grown to the largest capacity (the extra slots empty, as ``grow`` leaves them: a row attends to its
    own entries only) and stacked along the batch, rows of ``cs[0]`` first. ``method`` and ``lookahead`` are
    the first's, ``timings`` empty: only the rows' cache, logits and positions matter to ``decode``."""
    C = max(c.cache.capacity for c in cs)
    caches = [grow(c.cache, C - c.cache.capacity) if c.cache.capacity < C else c.cache for c in cs]
    cache = KVCache(*(jnp.concatenate([getattr(x, f) for x in caches], axis=0 if f == "length" else 1)
                      for f in ("k", "v", "pos", "length")))
    return Compressed(cs[0].method, cache, jnp.concatenate([c.logits for c in cs]),
                      jnp.concatenate([c.next_pos for c in cs]), sum((c.prompt_lengths for c in cs), []),
                      sum((c.compressed for c in cs), []), cs[0].lookahead, {})


MERGE_SPREAD = 4  # merged rows all grow to the group's largest capacity: merge capacities within this ratio


def merge_groups(cs: list[Compressed], spread: float = MERGE_SPREAD) -> list[list[int]]:
    """Indices of ``cs`` to decode together: in ascending capacity (ties by index), a config joins the current
    group while its capacity is at most ``spread`` times the group's smallest. A merged decode grows every row
    to the group's largest capacity, so the small caches of a budget sweep (64-256 entries) merge, and an
    uncompressed prompt's (``full``, thousands) decodes with its like, not in every row's memory and reads."""
    groups: list[list[int]] = []
    for i in sorted(range(len(cs)), key=lambda i: (cs[i].cache.capacity, i)):
        if groups and cs[i].cache.capacity <= spread * cs[groups[-1][0]].cache.capacity:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def decode_sweeps(target: Model, sweeps: list[list[Compressed]], *, max_new_tokens: int = 64,
                  sampling: Sampling | None = None, seed: int = 0, stop_ids=(),
                  kept_indices: bool = False) -> list[list[list[GenerationResult]]]:
    """Decode the compressed configs of several sweeps (``compress_budgets`` outputs: the budgets of one
    method, or of every kv method run on one batch); results per sweep, per config, per prompt. Greedy, the
    configs of each ``merge_groups`` group decode as one batch (``merge``): one decode loop reads the weights
    for all their rows, and a row's tokens do not depend on the rows beside it (up to float rounding, as in
    any batch). Sampling decodes each config on its own with ``seed``, as ``generate`` would. A merged
    decode's seconds are split among its configs by their rows (``timings["decode"]``);
    ``tokens_per_second`` is the merged batch's."""
    configs = [c for cs in sweeps for c in cs]
    greedy = sampling is None or float(sampling.temperature) == 0.0
    groups = merge_groups(configs) if greedy else [[i] for i in range(len(configs))]
    results = {}  # config index -> its results
    for indices in groups:
        group = [configs[i] for i in indices]
        out, decode_s, compile_s = decode(target, merge(group) if len(group) > 1 else group[0],
                                          max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                          stop_ids=stop_ids)
        tokens, n_gen, reasons = to_host(out.tokens), to_host(out.num_generated), to_host(out.finish_reason)
        tps = (int(n_gen.sum()) - len(n_gen)) / decode_s if decode_s > 0 else 0.0
        first = 0
        for i, c in zip(indices, group):
            rows = range(first, first + len(c.prompt_lengths))
            first = rows.stop
            timings = dict(c.timings, decode=decode_s * len(rows) / len(n_gen),
                           compile=c.timings["compile"] + compile_s)
            config = []
            quiet = c.pc is not None and isinstance(c.method, Full)  # a compressed prompt's whole cache
            for b, acc in zip(rows, accounting(c, target.config, kept_indices)):
                gen = tokens[b, : n_gen[b]].tolist()
                text = target.tokenizer.decode(gen) if target.tokenizer is not None else None
                config.append(GenerationResult(gen, text, FINISH_NAMES[int(reasons[b])],
                                               c.prompt_lengths[b - rows.start], dict(timings), tps,
                                               kv=None if quiet else acc,
                                               pc=None if c.pc is None else c.pc[b - rows.start]))
            results[i] = config
    it = iter(range(len(configs)))
    return [[results[next(it)] for _ in cs] for cs in sweeps]


def generate_budgets(target: Model, prompts: list[list[int]], methods: list[Method], *, draft: Model | None = None,
                     max_new_tokens: int = 64, sampling: Sampling | None = None, seed: int = 0, stop_ids=(),
                     kept_indices: bool = False, lookahead: list[list[int]] | None = None,
                     shared: dict | None = None) -> list[list[GenerationResult]]:
    """``generate`` with each config of a budget sweep (``compress_budgets``: one draft lookahead and one
    target prefill for all capacities; ``shared`` as there), then ``decode_sweeps`` (greedy: every
    capacity's rows as one batch); results per config."""
    cs = compress_budgets(target, prompts, methods, draft=draft, max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                          lookahead=lookahead, shared=shared)
    return decode_sweeps(target, [cs], max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                         stop_ids=stop_ids, kept_indices=kept_indices)[0]
