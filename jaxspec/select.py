"""Static-shape selection primitives shared by every KV-compression method (``jaxspec.kv``).

The split follows kvpress: a method computes a *score* per prompt KV entry and (layer, kv head); the
shared code turns scores into a compressed cache. Everything here has static shapes (no ``unique``, no
data-dependent ``k``), so one compiled program serves a whole bucket of prompt lengths:

* ``window_scores``: the target's prefill with ``AttnCapture`` — softmax probabilities of selected
  query rows against every key, reduced over the GQA group and the queries *inside* the forward, so no
  attention map is returned. Per-row query sets are ``start + i`` with a validity mask.
* ``pool1d``: max/mean pooling along keys with PyTorch ``max_pool1d``/``avg_pool1d`` semantics
  (stride 1, padding ``k // 2``; max pads with -inf, mean pads with zeros and always divides by ``k``).
* ``candidate_scores``: zero every non-candidate key, then pool, so pooling never reads window or
  padding keys (equivalent to pooling the candidate prefix alone, as the reference code does).
  These two live in ``jaxspec.models.sparse``: SpecKV's sparse prefill ranks inside every layer.
* ``select``: static-``k`` top-k per (layer, row, kv head) of the candidates ``[0, start)``, plus the
  protected recent window ``[start, end)`` which is always kept, under a per-(layer, row, head) budget
  mask inside the one static capacity ``k``.
* ``gather``: the compressed ``KVCache`` of capacity ``k``; every kept entry keeps its original RoPE
  position (keys are stored rotated, so nothing is re-rotated); unused slots get position ``-1``.

Ties. Max-pooling makes plateaus of bit-identical scores, and the budget cut often falls inside one.
Ties are always broken toward the LOWEST position: ``lax.top_k`` puts the lower index first among equal
values (documented by JAX, and tested in ``tests/test_select.py``), and slot ``j`` of a prefill cache
holds position ``j``.

Indices. After a right-padded prefill into an empty cache, slot ``j`` of row ``b`` holds the token at
position ``j``; so the selected indices are prompt positions.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxspec.cache import KVCache
from jaxspec.models.sparse import POOLS, candidate_scores, pool1d
from jaxspec.models.transformer import AttnCapture, forward

REDUCTIONS = ("max", "mean", "sum")
__all__ = ["POOLS", "REDUCTIONS", "candidate_scores", "gather", "pool1d", "query_rows", "select", "window_scores"]


def query_rows(start, count, num: int, how: str):
    """Capture rows ``start[b] + i`` for ``i < num`` (static); row ``i`` is valid iff ``i < count[b]`` and
    its index is ``>= 0``. Returns ``(index [B, num], weight [B, num])``: invalid rows get weight 0 (the
    captured probabilities are >= 0, so a zero row never wins a max or adds to a sum); for "mean" the valid
    rows are scaled by ``num / n_valid`` so that the mean over all ``num`` rows is the mean over the valid
    ones."""
    i = jnp.arange(num)[None, :]
    idx = start[:, None] + i
    valid = (i < count[:, None]) & (idx >= 0)
    w = valid.astype(jnp.float32)
    if how == "mean":
        w = w * (num / jnp.maximum(valid.sum(axis=1, keepdims=True), 1))
    return jnp.maximum(idx, 0), w


def window_scores(params, cfg, tokens, positions, cache, index, weight, *, group: str, queries: str, sparse=None):
    """Prefill ``tokens [B, T]`` (``positions`` ``-1`` = padding) into the empty ``cache`` (capacity ``T``)
    and capture the attention of the query rows ``index`` (weighted by ``weight``), reduced over the GQA
    group (``group``) and the rows (``queries``). Returns ``(last_logits [B, V], cache, scores [L, B, Hkv,
    T])``; ``scores[..., j]`` is the reduced probability mass on the key at slot (= position) ``j``.
    ``sparse``: ``(VerticalSlash, rows [B], start [B])`` for a vertical-slash sparse prefill whose layers
    take their vertical columns from these scores (``forward``'s ``sparse``, ``sparse_rows``,
    ``sparse_start``), or ``None`` (dense)."""
    capture = AttnCapture(index.shape[1], group=group, queries=queries)
    pattern, rows, start = sparse if sparse is not None else (None, None, None)
    logits, cache, aux = forward(params, cfg, tokens, positions, cache, last_only=True, empty_cache=True,
                                 capture=capture, capture_index=index, capture_weight=weight,
                                 sparse=pattern, sparse_rows=rows, sparse_start=start)
    return logits, cache, aux["attn"][..., cache.capacity:]  # keys: the (empty) cache slots, then the new tokens


def select(scores, start, end, budget, k: int):
    """Choose at most ``k`` (static) entries per (layer, row, head) from ``scores [L, B, H, N]``.

    The protected window ``[start[b], end[b])`` is always kept; of the candidates ``[0, start[b])`` the
    ``budget`` highest-scoring ones are kept (``budget`` broadcasts to ``[L, B, H]``: per-layer and per-head
    budgets are masks inside the one static ``k``); keys ``>= end`` are never kept. Ties go to the lowest
    position. Returns ``(index [L, B, H, k], keep [L, B, H, k])``, kept indices ascending first, then
    unused slots (``keep`` False, index clamped to a valid slot).
    Requires ``end - start <= k`` (the caller sizes ``k``).
    """
    N = scores.shape[-1]
    keys = jnp.arange(N)[None, None, None, :]
    lo, hi = start[None, :, None, None], end[None, :, None, None]
    s = jnp.where(keys < lo, scores, -jnp.inf)
    s = jnp.where((keys >= lo) & (keys < hi), jnp.inf, s)
    vals, order = lax.top_k(s, k)  # descending; equal values keep the lower index first
    rank = jnp.arange(k)
    allowed = (end - start)[None, :, None, None] + jnp.broadcast_to(budget, scores.shape[:3])[..., None]
    keep = (vals > -jnp.inf) & (rank < allowed)
    index = jnp.sort(jnp.where(keep, order, N), axis=-1)  # ascending positions, unused (N) last
    keep = index < N
    return jnp.minimum(index, N - 1), keep


def gather(cache: KVCache, index, keep) -> KVCache:
    """The compressed cache of capacity ``k = index.shape[-1]``: slot ``i`` of (layer, row, head) holds
    ``cache[..., index[..., i]]`` with its original position when ``keep``, else an empty slot (position -1,
    zero K/V). ``length`` is ``k`` for every row; decoding appends after it."""
    k = jnp.take_along_axis(cache.k, index[..., None], axis=3)
    v = jnp.take_along_axis(cache.v, index[..., None], axis=3)
    pos = jnp.where(keep, jnp.take_along_axis(cache.pos, index, axis=3), -1)
    k = jnp.where(keep[..., None], k, 0)
    v = jnp.where(keep[..., None], v, 0)
    return KVCache(k=k, v=v, pos=pos, length=jnp.full((cache.batch,), index.shape[-1], jnp.int32))
