"""One decoder-only transformer for every supported family (Llama 2/3, Qwen2/2.5, Qwen3).

Flax linen modules, applied functionally: parameters are a plain nested dict (pytree), the KV cache
is an explicit input and output, and the layers run as an ``nn.scan`` over stacked weights.
Draft and target models use this same ``forward``. The same modules also run unrolled over per-layer
weights (``unstack_layers``): the layout ``jaxspec.load`` uses on CPU, where it is twice as fast.

Parameter tree (stacked layer weights have a leading ``[L]`` axis; matrices are ``[out, in]`` as in
HF and GGUF checkpoints)::

    embed_tokens/embedding                      [V, D]
    layers/input_layernorm/scale                [L, D]
    layers/self_attn/{q,k,v}_proj/weight        [L, H*hd, D]   (+ bias [L, H*hd] for Qwen2)
    layers/self_attn/{q,k}_norm/scale           [L, hd]        (Qwen3)
    layers/self_attn/o_proj/weight              [L, D, Hq*hd]
    layers/post_attention_layernorm/scale       [L, D]
    layers/mlp/{gate,up}_proj/weight            [L, F, D]
    layers/mlp/down_proj/weight                 [L, D, F]
    norm/scale                                  [D]
    lm_head/weight                              [V, D]         (absent when embeddings are tied)

Attention semantics. Every token carries a RoPE position; position ``-1`` marks padding. A query
attends to (a) cache slots ``s < cache.length[b]`` whose stored position is ``>= 0`` and ``<=`` the
query's position, and (b) the new tokens of this call: by default causally by position, or by the
explicit ``mask_info[b, q, k]`` (tree attention for speculative verification). Valid new tokens must
form a prefix of the ``T`` axis; they are written into the cache at ``cache.length[b]`` and the
length advances by their count. Padding tokens are never written. A causal prefill longer than
``prefill_chunk`` (default ``PREFILL_CHUNK``) attends in chunks of query rows (``chunked_attention``):
the same math, without the ``[T, T]`` scores, and skipping the key blocks after each chunk — which needs
the valid positions to increase along the token axis, as every prompt's do (padded, or pruned with its
original positions kept).

Sparse prefill. ``forward(..., sparse=VerticalSlash(...))`` (SpecKV's vertical-slash prefill, see
``models/sparse.py``) makes every layer score before it attends: the captured rows' fp32 softmax over all
keys (dense, as the reference's ``compress_kv``) is reduced, pooled, and its top columns per kv head plus a
local band form the pattern that every query row of that layer attends under. Later layers therefore see
the sparse outputs (pitfall P16), and the captured scores are those of the sparse forward.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from .config import ModelConfig, rope_inv_freq
from . import cpu_kernels
from .cpu_kernels import project
from .sparse import MASK_VALUE as _MASK_VALUE
from .sparse import (VerticalSlash, blocked_attention, group_scores, group_values, masked_attention, vertical_columns,
                     vertical_slash_mask)

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class AttnCapture:
    """What attention to return from ``forward`` (static): the softmax probabilities (fp32, over every key
    the query sees) of ``num_queries`` selected new tokens, per layer, against all keys — the cache slots
    ``[0, S)`` followed by the new tokens ``[S, S + T)`` — reduced inside the layer so that no full
    attention map is materialised.

    ``group``: reduce over the query heads of each KV group: "max", "mean", "sum" or "none" (keep all
    query heads). ``queries``: reduce over the selected queries, each multiplied by its weight first:
    "max", "mean", "sum" or "none". The selected queries are given at call time as
    ``capture_index [B, num_queries]`` (indices into T) and optional ``capture_weight [B, num_queries]``.
    Output ``aux["attn"]``: ``[L, B, Hkv or Hq, (num_queries,) S + T]``.
    """

    num_queries: int
    group: str = "max"
    queries: str = "max"


def _reduce(x, how: str, axis: int):
    if how == "none":
        return x
    return {"max": jnp.max, "mean": jnp.mean, "sum": jnp.sum}[how](x, axis=axis)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE (HF layout). x [B, T, H, hd]; cos/sin [B, T, hd//2]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    c = cos[:, :, None, :].astype(x.dtype)
    s = sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def rope_tables(cfg: ModelConfig, positions):
    """cos/sin [B, T, hd//2] in float32 for integer positions [B, T]."""
    inv = jnp.asarray(rope_inv_freq(cfg))
    ang = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * inv
    return jnp.cos(ang), jnp.sin(ang)


class Linear(nn.Module):
    """``y = x @ weight.T (+ bias)`` with ``weight [out, in]`` — the HF/GGUF layout, so checkpoints load
    without transposes, and the layout XLA:CPU runs mat-vec decode fastest with (both operands
    contract their last, contiguous axis: ~1.3-1.5x the bandwidth of ``x @ kernel[in, out]``). On CPU, fp32
    inputs of at most ``cpu_kernels.ROWS_MAX`` rows (decode batches, speculative trees) take the small-row
    kernel of ``cpu_kernels``, which XLA's GEMM is several times slower than there."""

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.lecun_normal(), (self.features, x.shape[-1]), self.param_dtype)
        y = project(x.astype(self.dtype), w.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        return y


def _dense(cfg: ModelConfig, features: int, name: str, use_bias: bool = False):
    return Linear(features, use_bias=use_bias, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype, name=name)


PREFILL_CHUNK = 512  # query rows per step of a chunked prefill: forward's default ``prefill_chunk``


def causal_mask(positions, query_positions):
    """``[B, R, T]``: new key ``k`` is visible to a query at ``query_positions[b, r]`` iff it is a token
    (``positions[b, k] >= 0``) at or before the query's position. A padding query (-1) sees no new key."""
    return (positions[:, None, :] >= 0) & (positions[:, None, :] <= query_positions[:, :, None])


def cache_visible(cache_pos, cache_len, query_positions):
    """``[B, Hk, R, S]``: cache slot ``s`` is visible to a query at ``query_positions[b, r]`` iff it is in use
    (``s < length``), holds an entry (stored position ``>= 0``) and that entry is not after the query."""
    live = (jnp.arange(cache_pos.shape[-1]) < cache_len[:, None, None]) & (cache_pos >= 0)  # [B, Hk, S]
    return live[:, :, None, :] & (cache_pos[:, :, None, :] <= query_positions[:, None, :, None])


def write_layer(buf, layer, new, valid, start):
    """``buf [L, B, Hk, S, ...]`` with layer ``layer`` (an int, or a traced scalar under ``scan``) holding the
    new entries ``new [B, Hk, T, ...]`` of row ``b`` at slots ``[start[b], start[b] + T)``; ``layer=None`` writes
    every layer, with ``new [L, B, Hk, T, ...]`` (or ``[B, Hk, T, ...]``, the same for all layers);
    where ``valid [B, T]`` is False (padding) nothing is written. Valid entries must be a prefix of ``T``; the
    caller guarantees ``start + valid <= capacity`` (generation reports ``cache_full`` rather than writing past
    it), and an entry past the capacity would be dropped, never written over another slot.

    ``forward`` writes the positions of every layer first and each layer's keys and values just before that
    layer reads its cache slots (masked to the old length, so the new entries are not counted twice): every
    read of a buffer then follows the writes it sees, and XLA updates the buffers in place. Reading the old
    slots first would make a decode loop copy the whole cache every step (a layer's write does not depend on
    its own read)."""
    (B, Hk), T = buf.shape[1:3], valid.shape[1]
    slot = jnp.where(valid, start[:, None] + jnp.arange(T), buf.shape[3])  # padding: out of range, dropped
    rows = (jnp.arange(B)[:, None, None], jnp.arange(Hk)[None, :, None], slot[:, None, :])  # [B, Hk, T] each
    # one scatter for the whole batch (a loop of per-row updates compiles B x layers ops; a vmap of them moves
    # the batch axis first, which makes XLA copy the buffer)
    at = buf.at[(slice(None),) + rows] if layer is None else buf.at[(layer,) + rows]
    buf = at.set(new.astype(buf.dtype), mode="drop", indices_are_sorted=True)
    return buf


class LayerCache(NamedTuple):
    """One layer's view of the cache for attention: its slots ``k, v [B, Hk, S, hd]``, ``pos [B, Hk, S]``,
    ``length [B]``, and the whole-model buffers ``k_all, v_all [L, B, Hk, S, hd]`` with the layer's index
    ``layer``, which the CPU decode-attention kernels read in place (``cache_scores``, ``cache_values``)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array
    k_all: jax.Array
    v_all: jax.Array
    layer: jax.Array | int


def _merged_buffers(cache: LayerCache, rows: int, operand):
    """The whole-model K and V buffers with batch and kv heads merged (``[L, B * Hk, S, hd]``, a free
    reshape) for the CPU kernels, or None where they do not apply to ``rows`` query rows a kv group and the
    fp32 ``operand`` (``cpu_kernels.use_cache_kernels``)."""
    if cache.k_all.ndim != 5 or not cpu_kernels.use_cache_kernels(rows, operand, cache.k_all, cache.v_all):
        return None
    L, B, Hk, S, hd = cache.k_all.shape
    return cache.k_all.reshape(L, B * Hk, S, hd), cache.v_all.reshape(L, B * Hk, S, hd)


def cache_scores(q, cache: LayerCache):
    """fp32 scores ``[B, Hk, G, R, S]`` of ``q [B, Hk, G, R, hd]`` against the layer's cache slots."""
    B, Hk, G, R, hd = q.shape
    bufs = _merged_buffers(cache, G * R, q)
    if bufs is None:
        return group_scores(q, cache.k.astype(q.dtype))
    s = cpu_kernels.cache_scores(q.reshape(B * Hk, G * R, hd), bufs[0], cache.layer)
    return s.reshape(B, Hk, G, R, cache.k.shape[2])


def cache_values(p, cache: LayerCache, dtype, preferred_element_type=None):
    """``p [B, Hk, G, R, S]`` (fp32) times the layer's cached values -> ``[B, Hk, G, R, hd]``."""
    B, Hk, G, R, S = p.shape
    bufs = _merged_buffers(cache, G * R, p)
    if bufs is None:
        return group_values(p.astype(dtype), cache.v.astype(dtype), preferred_element_type)
    out = cpu_kernels.cache_values(p.reshape(B * Hk, G * R, S), bufs[1], cache.layer)
    return out.reshape(B, Hk, G, R, cache.v.shape[-1]).astype(preferred_element_type or dtype)


def attention_logits(q, kn, new_ok, cache: LayerCache | None, query_positions):
    """Masked fp32 logits of the pre-scaled queries ``q [B, Hk, G, R, hd]`` against the new keys ``kn [B, Hk,
    T, hd]`` under ``new_ok [B, R, T]``, and against the cache slots (a ``LayerCache``, or ``None`` when the
    caller promised an empty cache: that ``R x S`` half of the work is skipped).
    Returns ``(s_old or None, s_new, m)``, ``m`` the row max over both key sets."""
    s_new = group_scores(q, kn)
    s_new = jnp.where(new_ok[:, None, None], s_new, _MASK_VALUE)
    if cache is None:
        return None, s_new, s_new.max(-1, keepdims=True)
    s_old = cache_scores(q, cache)
    s_old = jnp.where(cache_visible(cache.pos, cache.length, query_positions)[:, :, None], s_old, _MASK_VALUE)
    return s_old, s_new, jnp.maximum(s_old.max(-1, keepdims=True), s_new.max(-1, keepdims=True))


def attend(q, kn, vn, new_ok, cache: LayerCache | None, query_positions, dtype):
    """Attention of ``q [B, Hk, G, R, hd]`` to the cache slots and the new keys: one fp32 softmax over both
    key sets (see ``attention_logits``). Returns ``[B, Hk, G, R, hd]``."""
    s_old, s_new, m = attention_logits(q, kn, new_ok, cache, query_positions)
    p_new = jnp.exp(s_new - m)
    out = group_values(p_new.astype(dtype), vn)
    denom = p_new.sum(-1, keepdims=True)
    if s_old is not None:
        p_old = jnp.exp(s_old - m)
        denom = denom + p_old.sum(-1, keepdims=True)
        out = out + cache_values(p_old, cache, dtype).astype(out.dtype)
    return out / denom.astype(out.dtype)


def chunked_attention(q, kn, vn, positions, cache, chunk: int, dtype):
    """Causal attention by position, ``chunk`` query rows at a time (``lax.map``), each chunk visiting only
    the key blocks up to its own last row (a flash-attention loop with an online fp32 softmax): about half the
    score and value FLOPs of attending every chunk to all ``T`` keys, and no ``[T, T]`` scores or mask —
    the widest array is a chunk's ``[B, Hk, G, chunk, max(S, chunk)]``.

    The ``n = ceil(T / chunk)`` chunks are balanced (``ceil(T / n)`` rows each), so fewer than ``n`` rows are
    padding (position -1: they see no key, and are cut off). New keys are cut into blocks of the same size;
    chunk ``i`` visits blocks ``0..i`` (a loop with a dynamic trip count and static shapes), after the cache
    slots (dense, as in ``attend``). Skipping the later blocks is exact because positions increase along the
    token axis (``forward``'s contract): a key after a chunk's last row is after every row of it."""
    B, Hk, G, T, hd = q.shape
    n = -(-T // chunk)
    c = -(-T // n)
    pad = n * c - T
    qs = jnp.pad(q, ((0, 0),) * 3 + ((0, pad), (0, 0)))
    ks = jnp.pad(kn, ((0, 0), (0, 0), (0, pad), (0, 0)))
    vs = jnp.pad(vn, ((0, 0), (0, 0), (0, pad), (0, 0)))
    ps = jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)

    def step(i):
        qc = lax.dynamic_slice_in_dim(qs, i * c, c, axis=3)  # [B, Hk, G, c, hd]
        pc = lax.dynamic_slice_in_dim(ps, i * c, c, axis=1)  # [B, c]
        if cache is None:
            m = jnp.full((B, Hk, G, c, 1), _MASK_VALUE, jnp.float32)
            l = jnp.zeros((B, Hk, G, c, 1), jnp.float32)
            acc = jnp.zeros((B, Hk, G, c, hd), jnp.float32)
        else:
            s = cache_scores(qc, cache)
            s = jnp.where(cache_visible(cache.pos, cache.length, pc)[:, :, None], s, _MASK_VALUE)
            m = s.max(-1, keepdims=True)
            p = jnp.exp(s - m)
            l = p.sum(-1, keepdims=True)
            acc = cache_values(p, cache, dtype, jnp.float32)

        def block(j, carry):
            m, l, acc = carry
            kb = lax.dynamic_slice_in_dim(ks, j * c, c, axis=2)  # [B, Hk, c, hd]
            vb = lax.dynamic_slice_in_dim(vs, j * c, c, axis=2)
            kp = lax.dynamic_slice_in_dim(ps, j * c, c, axis=1)
            s = group_scores(qc, kb)
            s = jnp.where(causal_mask(kp, pc)[:, None, None], s, _MASK_VALUE)
            m_new = jnp.maximum(m, s.max(-1, keepdims=True))
            p = jnp.exp(s - m_new)
            scale = jnp.exp(m - m_new)  # a row that saw only masked keys so far (m = MASK) restarts here
            return (m_new, l * scale + p.sum(-1, keepdims=True),
                    acc * scale + group_values(p.astype(dtype), vb, jnp.float32))

        _, l, acc = lax.fori_loop(0, i + 1, block, (m, l, acc))
        return (acc / l).astype(dtype)

    out = lax.map(step, jnp.arange(n))  # [n, B, Hk, G, c, hd]
    return jnp.moveaxis(out, 0, 3).reshape(B, Hk, G, n * c, hd)[:, :, :, :T]


class Attention(nn.Module):
    """Self-attention of the ``T`` new tokens. ``chunk`` (static): attend ``chunk`` query rows at a time
    (``chunked_attention``; causal prefill only, the new-token mask is then built per chunk from positions
    and ``new_mask`` is ``None``), or all rows at once under ``new_mask [B, T, T]`` when ``None``."""

    cfg: ModelConfig
    capture: AttnCapture | None = None
    attend_cache: bool = True
    sparse: VerticalSlash | None = None
    chunk: int | None = None

    @nn.compact
    def __call__(self, x, cos, sin, positions, new_mask, cache_all, layer, cache_len, cap_index, cap_weight,
                 sparse_rows, sparse_start):
        """``cache_all = (k, v, pos)`` are the whole model's cache buffers, the new positions already in ``pos``;
        this layer writes its new keys and values into layer ``layer`` (``write_layer``) and then attends to
        that layer's slots below ``cache_len``. Returns the output, the updated buffers and the captured scores
        (or None)."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, Hk, hd, G = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.group_size
        q = _dense(cfg, H * hd, "q_proj", cfg.qkv_bias)(x).reshape(B, T, H, hd)
        k = _dense(cfg, Hk * hd, "k_proj", cfg.qkv_bias)(x).reshape(B, T, Hk, hd)
        v = _dense(cfg, Hk * hd, "v_proj", cfg.qkv_bias)(x).reshape(B, T, Hk, hd)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name="k_norm")(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        # [B, Hk, G, T, hd] queries; new keys/values [B, Hk, T, hd]
        qg = q.reshape(B, T, Hk, G, hd).transpose(0, 2, 3, 1, 4) * jnp.asarray(hd**-0.5, q.dtype)
        kn = k.transpose(0, 2, 1, 3)
        vn = v.transpose(0, 2, 1, 3)
        k_all, v_all, pos_all = cache_all
        k_all, v_all = (write_layer(buf, layer, new, positions >= 0, cache_len) for buf, new in
                        ((k_all, kn), (v_all, vn)))
        cache_k, cache_v, cache_pos = (buf[layer] if isinstance(layer, int) else
                                       lax.dynamic_index_in_dim(buf, layer, 0, keepdims=False)
                                       for buf in (k_all, v_all, pos_all))
        if self.sparse is not None:
            out, captured = self._sparse_prefill(qg, kn, vn, positions, cache_k.shape[2], cap_index, cap_weight,
                                                 sparse_rows, sparse_start)
        else:
            cache = (LayerCache(cache_k, cache_v, cache_pos, cache_len, k_all, v_all, layer) if self.attend_cache
                     else None)
            if self.chunk is None:
                out = attend(qg, kn, vn, new_mask, cache, positions, cfg.jnp_dtype)
            else:
                out = chunked_attention(qg, kn, vn, positions, cache, self.chunk, cfg.jnp_dtype)
            captured = None
            if self.capture is not None:
                captured = self._captured(qg, kn, new_mask, cache, positions, cache_k.shape[2], cap_index,
                                          cap_weight)
        out = _dense(cfg, cfg.hidden_size, "o_proj")(out.transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd))
        return out, (k_all, v_all, pos_all), captured

    def _captured(self, qg, kn, new_mask, cache, positions, S, cap_index, cap_weight):
        """Probabilities of the selected query rows, reduced as ``self.capture`` says. The rows are scored
        again on their own (``R`` rows against ``S + T`` keys, under the same masks as in ``attend``)
        rather than read from the attention's scores: a chunked prefill never holds every row's scores.
        In a chunked prefill, more than ``chunk`` captured rows (H2O captures all ``T``) that are reduced over
        the rows are scored ``chunk`` rows at a time and reduced as they go, so no ``[T, S + T]`` map exists:
        each row's softmax is over all its keys either way, so this is exact. Without a cache (``cache`` None:
        an empty one was promised) the ``S`` slots get probability 0: they are reduced as the new keys only and
        put in front as zeros afterwards, so no ``[rows, S]`` block of zeros is written and read again."""
        out = self._captured_new(qg, kn, new_mask, cache, positions, S, cap_index, cap_weight)
        if cache is None and S:
            out = jnp.pad(out, ((0, 0),) * (out.ndim - 1) + ((S, 0),))
        return out

    def _captured_new(self, qg, kn, new_mask, cache, positions, S, cap_index, cap_weight):
        """``_captured`` over the keys ``_row_probs`` returns: the cache slots and the new keys, or the new
        keys alone when ``cache`` is None."""
        R = cap_index.shape[1]
        if self.chunk is None or R <= self.chunk or self.capture.queries == "none":
            p, l = self._row_probs(qg, kn, new_mask, cache, positions, S, cap_index)
            return self._reduce_rows(p, l, cap_weight)
        n = -(-R // self.chunk)
        c = -(-R // n)  # balanced: every chunk holds real rows
        pad = ((0, 0), (0, n * c - R))
        index = jnp.pad(cap_index, pad)
        weight = jnp.pad(jnp.ones(cap_index.shape, jnp.float32) if cap_weight is None else cap_weight, pad)
        real = jnp.arange(n * c) < R
        how = self.capture.queries

        def step(i):
            p, l = self._row_probs(qg, kn, new_mask, cache, positions, S,
                                   lax.dynamic_slice_in_dim(index, i * c, c, axis=1))
            return self._reduce_rows(p, l, lax.dynamic_slice_in_dim(weight, i * c, c, axis=1),
                                     "max" if how == "max" else "sum", lax.dynamic_slice_in_dim(real, i * c, c))

        parts = lax.map(step, jnp.arange(n))  # [n, B, Hk or H, S + T] (T without a cache)
        return parts.max(0) if how == "max" else parts.sum(0) / (R if how == "mean" else 1)

    def _row_probs(self, qg, kn, new_mask, cache, positions, S, cap_index):
        """The query rows ``cap_index [B, R]``'s fp32 softmax over the ``S + T`` keys, unnormalised: ``exp(s - m)
        [B, Hk, G, R, S + T]`` and its row sums ``[B, Hk, G, R, 1]``; over the ``T`` new keys alone when
        ``cache`` is None (the ``S`` empty slots would be zeros)."""
        qc = jnp.take_along_axis(qg, cap_index[:, None, None, :, None], axis=3)  # [B, Hk, G, R, hd]
        qpos = jnp.take_along_axis(positions, cap_index, axis=1)
        new_ok = (causal_mask(positions, qpos) if new_mask is None
                  else jnp.take_along_axis(new_mask, cap_index[:, :, None], axis=1))
        s_old, s_new, m = attention_logits(qc, kn, new_ok, cache, qpos)
        p = jnp.exp(s_new - m)
        if s_old is not None:
            p = jnp.concatenate([jnp.exp(s_old - m), p], -1)
        return p, p.sum(-1, keepdims=True)

    def _reduce_rows(self, p, l, cap_weight, queries: str | None = None, real=None):
        """The probabilities ``p / l`` (``[B, Hk, G, rows, K]``, see ``_row_probs``), weighted by ``cap_weight [B,
        rows]`` and reduced over the group and the rows (``queries``, default the capture's own); rows where
        ``real [rows]`` is False are left out. Sums and means are one contraction of ``p`` with the rows'
        coefficients ``weight / l`` (an elementwise pass and a reduction over ``[.., rows, K]`` cost XLA:CPU
        several times more: it recomputes the fused softmax inside the reduction loops)."""
        cap = self.capture
        queries = queries or cap.queries
        B, Hk, G, Wq, K = p.shape
        w = jnp.ones((B, Wq), jnp.float32) if cap_weight is None else cap_weight.astype(jnp.float32)
        if real is not None:
            w = jnp.where(real[None], w, 0.0)
        if cap.group != "max" and queries in ("mean", "sum"):
            coef = w[:, None, None, :] / l[..., 0]  # [B, Hk, G, rows]
            coef = coef / ((G if cap.group == "mean" else 1) * (Wq if queries == "mean" else 1))
            if cap.group == "none":
                return jnp.einsum("bhgrk,bhgr->bhgk", p, coef, preferred_element_type=jnp.float32).reshape(B, Hk * G, K)
            return jnp.einsum("bhgrk,bhgr->bhk", p, coef, preferred_element_type=jnp.float32)
        probs = p / l * w[:, None, None, :, None]
        if real is not None and queries == "max":
            probs = jnp.where(real[None, None, None, :, None], probs, -jnp.inf)
        probs = _reduce(probs, cap.group, axis=2)
        if cap.group == "none":
            probs = probs.reshape(B, Hk * G, Wq, K)
        return _reduce(probs, queries, axis=2)

    def _sparse_prefill(self, qg, kn, vn, positions, S, cap_index, cap_weight, sparse_rows, sparse_start):
        """Score, then attend (SpecKV's layer). The captured rows' probabilities are a dense fp32 softmax over
        every causal key — the scoring queries score with full attention, as the reference's ``compress_kv``
        does — reduced to ``[B, Hk, T]``; their top columns (``vertical_columns``) and the band are the
        pattern under which all ``T`` rows, the scoring rows included, compute their outputs. Returns the
        pre-``o_proj`` output ``[B, Hk, G, T, hd]`` and the captured scores with ``S`` (empty) cache slots
        first, the layout of the dense path."""
        sp, dtype = self.sparse, self.cfg.jnp_dtype
        captured = self._captured(qg, kn, None, None, positions, S, cap_index, cap_weight)  # [B, Hk, S + T]
        cols, valid = vertical_columns(captured[..., S:], sparse_rows, sparse_start, sp)
        if sp.dense_reference:
            out = masked_attention(qg, kn, vn, vertical_slash_mask(positions, cols, valid, sp.window), dtype)
        else:
            out = blocked_attention(qg, kn, vn, positions, cols, valid, sp.window, sp.chunk, dtype)
        return out, captured


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        g = _dense(cfg, cfg.intermediate_size, "gate_proj")(x)
        u = _dense(cfg, cfg.intermediate_size, "up_proj")(x)
        return _dense(cfg, cfg.hidden_size, "down_proj")(nn.silu(g) * u)


class Block(nn.Module):
    """One decoder layer: ``carry = (hidden state, (k, v, pos) cache buffers of every layer)``, ``layer`` its index
    (an int when unrolled, scanned over ``arange(L)`` under ``nn.scan``)."""

    cfg: ModelConfig
    capture: AttnCapture | None = None
    attend_cache: bool = True
    sparse: VerticalSlash | None = None
    chunk: int | None = None

    @nn.compact
    def __call__(self, carry, layer, cos, sin, positions, new_mask, cache_len, cap_index, cap_weight, sparse_rows,
                 sparse_start):
        cfg = self.cfg
        x, cache_all = carry
        norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype)
        attn = Attention(cfg, self.capture, self.attend_cache, self.sparse, self.chunk, name="self_attn")
        h, cache_all, captured = attn(
            norm(name="input_layernorm")(x), cos, sin, positions, new_mask, cache_all, layer, cache_len,
            cap_index, cap_weight, sparse_rows, sparse_start,
        )
        x = x + h
        x = x + MLP(cfg, name="mlp")(norm(name="post_attention_layernorm")(x))
        return (x, cache_all), captured


class Transformer(nn.Module):
    cfg: ModelConfig
    capture: AttnCapture | None = None
    scan: bool = True  # stacked layer weights + nn.scan; False: one weight set per layer, unrolled
    attend_cache: bool = True
    sparse: VerticalSlash | None = None
    chunk: int | None = None  # Attention.chunk

    @nn.compact
    def __call__(self, tokens, positions, cache_k, cache_v, cache_pos, cache_len, new_mask, last_index,
                 cap_index=None, cap_weight=None, sparse_rows=None, sparse_start=None):
        cfg = self.cfg
        embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
            name="embed_tokens",
        )
        x = embed(tokens)
        cos, sin = rope_tables(cfg, positions)
        shared = (cos, sin, positions, new_mask, cache_len, cap_index, cap_weight, sparse_rows, sparse_start)
        new_pos = jnp.broadcast_to(positions[:, None], (positions.shape[0], cfg.num_kv_heads, positions.shape[1]))
        carry = (x, (cache_k, cache_v, write_layer(cache_pos, None, new_pos, positions >= 0, cache_len)))
        if self.scan:
            Scan = nn.scan(
                Block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0,) + (nn.broadcast,) * len(shared),
                length=cfg.num_layers,
            )
            layers = Scan(cfg, self.capture, self.attend_cache, self.sparse, self.chunk, name="layers")
            (x, cache_all), captured = layers(carry, jnp.arange(cfg.num_layers), *shared)
        else:
            captures = []
            for i in range(cfg.num_layers):
                carry, cap = Block(cfg, self.capture, self.attend_cache, self.sparse, self.chunk,
                                   name=f"layers_{i}")(carry, i, *shared)
                captures.append(cap)
            x, cache_all = carry
            captured = None if self.capture is None else jnp.stack(captures)
        if last_index is not None:
            x = jnp.take_along_axis(x, last_index[:, None, None], axis=1)[:, 0]
        x = RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name="norm")(x)
        if cfg.tie_word_embeddings:
            logits = project(x.astype(cfg.jnp_dtype), embed.embedding.astype(cfg.jnp_dtype))
        else:
            logits = _dense(cfg, cfg.vocab_size, "lm_head")(x)
        return logits.astype(jnp.float32), cache_all, captured


def init_params(cfg: ModelConfig, rng=None, scale: float = 0.02) -> Params:
    """Random parameters of the right structure (for tests and abstract shapes)."""
    from jaxspec.cache import KVCache  # local import: models/ stays free of jaxspec at import time

    rng = jax.random.PRNGKey(0) if rng is None else rng
    cache = KVCache.create(cfg, batch=1, capacity=1)
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = Transformer(cfg).init(
        rng, tokens, tokens, cache.k, cache.v, cache.pos, cache.length, jnp.ones((1, 1, 1), bool), None
    )
    return variables["params"]


def param_shapes(cfg: ModelConfig) -> Params:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    return jax.eval_shape(lambda: init_params(cfg))


def is_stacked(params: Params) -> bool:
    return "layers" in params


def unstack_layers(params: Params) -> Params:
    """Stacked ``layers/...[L, ...]`` -> ``layers_0 ... layers_{L-1}``, one buffer per layer.

    The execution layout for CPU decode: XLA:CPU copies each layer's weights out of a stacked array
    inside ``scan`` (a dynamic slice feeding a dot is not fused), which halves the effective memory
    bandwidth of mat-vec decode. Leaves are split one at a time, so peak memory grows by one leaf.
    """
    if not is_stacked(params):
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    stacked = params["layers"]
    L = jax.tree.leaves(stacked)[0].shape[0]
    per_layer: list[dict] = [{} for _ in range(L)]
    for path, leaf in jax.tree_util.tree_flatten_with_path(stacked)[0]:
        keys = [k.key for k in path]
        for i in range(L):
            node = per_layer[i]
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = leaf[i]
    for i in range(L):
        out[f"layers_{i}"] = per_layer[i]
    return out


def stack_layers(params: Params) -> Params:
    """Inverse of ``unstack_layers``: the canonical (conversion and checkpoint) layout."""
    if is_stacked(params):
        return params
    names = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *[params[n] for n in names])
    return out


def matmul_precision(cfg: ModelConfig) -> str:
    """An fp32 model computes its matmuls in fp32: "highest" on GPUs and TPUs, whose default rounds fp32
    operands to TF32/bf16 passes (1e-2 logit errors on an H100, against transformers' true fp32). On CPU the
    default already is plain fp32 (same results), and "highest" would cost: XLA:CPU then hands the attention
    score dot a transposed copy of every layer's cache keys each decode step. Lower-precision models keep the
    backend's default."""
    return "highest" if cfg.dtype == "float32" and jax.default_backend() != "cpu" else "default"


def forward(params: Params, cfg: ModelConfig, tokens, positions, cache, *, mask_info=None, last_only=False,
            capture: AttnCapture | None = None, capture_index=None, capture_weight=None, empty_cache=False,
            sparse: VerticalSlash | None = None, sparse_rows=None, sparse_start=None,
            prefill_chunk: int = PREFILL_CHUNK):
    """Run the model over ``tokens [B, T]`` at ``positions [B, T]`` (``-1`` = padding).

    Returns ``(logits, new_cache, aux)``: logits are ``[B, T, V]``, or ``[B, V]`` for the last valid
    token of each row when ``last_only``; ``aux`` holds ``num_new [B]`` (tokens written).
    ``mask_info`` is an optional ``[B, T, T]`` boolean mask among the new tokens (tree attention);
    by default new tokens attend causally by position. ``capture`` (static) with ``capture_index``
    (and optional ``capture_weight``) adds ``aux["attn"]``, see ``AttnCapture``. ``empty_cache=True``
    (static) promises that ``cache`` holds no entries yet — a fresh prefill — and skips attending to it.
    ``sparse`` (static) makes the prefill vertical-slash sparse (see the module docstring); it needs a fresh
    causal prefill (``empty_cache``, no ``mask_info``) and a ``capture`` reduced over group and queries, whose
    rows score each layer. ``sparse_rows [B]`` says which rows use the pattern (the others get its dense
    equivalent, exact for query positions ``<= window + vertical``); the vertical columns of row ``b`` are
    chosen among the keys ``[0, sparse_start[b])``.

    ``prefill_chunk`` (static; 0: never): a causal forward (no ``mask_info``, not ``sparse``) of more than
    ``prefill_chunk`` new tokens attends at most that many query rows at a time (``chunked_attention``), so
    a long prefill holds ``[B, H, chunk, S + T]`` scores instead of ``[B, H, T, S + T]``; the math is the
    same, row by row (captured rows included: ``Attention._captured`` scores them on their own). It is an
    argument here, with the module default ``PREFILL_CHUNK``, rather than a ``ModelConfig`` field: it
    changes memory and schedule, not the model, while the config is the model's identity (hashed as the
    static argument of every jitted stage, serialised with converted checkpoints), so every pipeline
    chunks long prefills without passing anything, and a test or benchmark picks the size per call.

    ``forward`` is a ``jax.jit`` function (the static arguments above, plus whether the CPU kernels are on,
    key its compilations): inside another jit it is inlined, and a direct call — a test, a notebook, a
    benchmark step — runs one compiled program instead of dispatching every layer's operations one by one.
    """
    return _forward(params, cfg, tokens, positions, cache, mask_info=mask_info, last_only=last_only,
                    capture=capture, capture_index=capture_index, capture_weight=capture_weight,
                    empty_cache=empty_cache, sparse=sparse, sparse_rows=sparse_rows, sparse_start=sparse_start,
                    prefill_chunk=prefill_chunk,
                    kernels=(cpu_kernels.enabled("matmul"), cpu_kernels.enabled("attention")))


@functools.partial(jax.jit, static_argnames=("cfg", "last_only", "capture", "empty_cache", "sparse",
                                             "prefill_chunk", "kernels"))
def _forward(params, cfg, tokens, positions, cache, *, mask_info, last_only, capture, capture_index,
             capture_weight, empty_cache, sparse, sparse_rows, sparse_start, prefill_chunk, kernels):
    del kernels  # read by ``project`` while tracing; a static argument so that switching it recompiles
    positions = positions.astype(jnp.int32)
    T = positions.shape[1]
    chunk = prefill_chunk if mask_info is None and sparse is None and 0 < prefill_chunk < T else None
    if sparse is not None or chunk is not None:  # no [T, T] mask: these layers mask by position, blockwise
        new_mask = None
    else:
        new_mask = (causal_mask(positions, positions) if mask_info is None
                    else (mask_info & (positions[:, None, :] >= 0)))
    last_index = jnp.argmax(positions, axis=1) if last_only else None
    if (capture is None) != (capture_index is None):
        raise ValueError("capture and capture_index go together")
    if sparse is not None and (not empty_cache or mask_info is not None or capture is None
                               or "none" in (capture.group, capture.queries) or sparse_rows is None
                               or sparse_start is None):
        raise ValueError("sparse needs empty_cache, causal attention, a reducing capture, sparse_rows and "
                         "sparse_start")
    with jax.default_matmul_precision(matmul_precision(cfg)):
        logits, (k, v, pos), captured = Transformer(cfg, capture, is_stacked(params), not empty_cache,
                                                     sparse, chunk).apply(
            {"params": params},
            tokens.astype(jnp.int32), positions, cache.k, cache.v, cache.pos, cache.length, new_mask, last_index,
            capture_index, capture_weight, sparse_rows, sparse_start,
        )
    num_new = (positions >= 0).sum(axis=1).astype(jnp.int32)
    new_cache = cache.replace(k=k, v=v, pos=pos, length=cache.length + num_new)
    aux = {"num_new": num_new}
    if capture is not None:
        aux["attn"] = captured
    return logits, new_cache, aux
