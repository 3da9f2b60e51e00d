"""Vertical-slash sparse attention for a fresh prefill: SpecKV's sparse prefill (Galim et al., §1.4 of
``shared/research/speckv.md``), the pattern of MInference's ``vertical_slash_sparse_attention``.

The reference passes ``v_idx`` = the top ``V`` scored prefix columns of a KV head (shared by its query
heads) and the slash offsets ``{P, P-64, ..., 64, 0}`` (``P = prefill_window_size``) to the kernel, which
works on 64-row query blocks. ``convert_vertical_slash_indexes`` merges the offsets, spaced exactly one
block apart, into one contiguous key band per query block: block ``b`` (rows ``[64b, 64b + 64)``) sees
the band ``[max(0, 64b - P), 64b + 64)`` under the causal mask, plus every vertical column LEFT of the
band; columns inside the band are not counted twice, columns right of it are dropped. So query row ``i``
sees::

    { j <= i : j >= band_start(i) }  ∪  { j in V_g : j < band_start(i) },   band_start(i) = max(0, 64⌊i/64⌋ - P)

and the softmax is over exactly this set. Two implementations of the same mask:

* ``vertical_slash_mask`` + ``masked_attention``: the full ``[T, T]`` boolean mask and dense attention;
  the reference for tests and small sizes;
* ``blocked_attention``: ``lax.map`` over chunks of query rows; a chunk attends to its ``P + chunk`` band
  keys (a ``dynamic_slice``) and to the ``V`` gathered vertical columns, so the work per row is
  ``P + chunk + V`` keys instead of ``T``, and no ``[T, T]`` array exists.

Rows of a batch have their own lengths (``positions``, ``-1`` = padding) and their own choice of sparse or
dense: a row that must stay dense gets the vertical columns ``0 .. V-1`` (``vertical_columns``). Together
with the band they cover every causal key of every query row ``i <= P + V`` (the band's left edge is at
most ``i - P``), so such a row is attended densely — the same static shapes, no second program.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

POOLS = ("max", "mean")
BLOCK = 64  # the kernel's query/key block: the granularity of the band
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: a fully masked row stays NaN-free


@dataclasses.dataclass(frozen=True)
class VerticalSlash:
    """The sparse-prefill pattern (static). ``window``: ``prefill_window_size`` ``P`` (a multiple of 64);
    ``vertical``: ``prefill_vertical_size`` ``V`` columns per kv head, the top of the layer's pooled scores
    (``kernel_size``, ``pool_type``, as the method selects its kept entries); ``chunk``: query rows per step
    of ``blocked_attention`` (a multiple of 64); ``dense_reference``: use the full masked attention instead
    (tests)."""

    window: int
    vertical: int
    kernel_size: int
    pool_type: str
    chunk: int = 256
    dense_reference: bool = False

    def __post_init__(self):
        if self.window % BLOCK or self.chunk % BLOCK or self.chunk < BLOCK:
            raise ValueError(f"window ({self.window}) and chunk ({self.chunk}) must be multiples of {BLOCK}")


def pool1d(x, kernel_size: int, pool_type: str):
    """1-D pooling along the last axis, stride 1, output length = input length (PyTorch semantics with
    ``padding = kernel_size // 2``): "max" pads with -inf (max over the available neighbours), "mean" pads
    with zeros and divides by ``kernel_size`` (``count_include_pad=True``). ``kernel_size`` must be odd."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
    if pool_type not in POOLS:
        raise ValueError(f"pool_type must be one of {POOLS}, got {pool_type!r}")
    dims = (1,) * (x.ndim - 1) + (kernel_size,)
    strides = (1,) * x.ndim
    pad = ((0, 0),) * (x.ndim - 1) + ((kernel_size // 2, kernel_size // 2),)
    if pool_type == "max":
        return lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, pad)
    return lax.reduce_window(x, 0.0, lax.add, dims, strides, pad) / kernel_size


def candidate_scores(scores, start, kernel_size: int, pool_type: str):
    """Pool ``scores [..., B, H, N]`` over the candidate prefix ``[0, start[b])`` only: other keys are
    zeroed first. Scores are probabilities (>= 0), so a zero neighbour never changes a max, and a zero is
    exactly the padding of a mean pool: the result on candidates equals pooling the prefix alone."""
    cand = jnp.arange(scores.shape[-1]) < start[:, None, None]
    return pool1d(jnp.where(cand, scores, 0.0), kernel_size, pool_type)


def vertical_columns(scores, sparse_rows, start, sp: VerticalSlash):
    """The vertical columns of one layer: ``(cols, valid)``, both ``[B, Hkv, V]``.

    Rows with ``sparse_rows``: the ``V`` best candidates ``[0, start)`` of the pooled ``scores [B, Hkv,
    T]`` (ties to the lowest position, the order the kept entries are chosen in); fewer candidates than
    ``V`` leave invalid slots. Other rows: ``0 .. V-1``, all valid (the dense-equivalent pattern)."""
    pooled = candidate_scores(scores, start, sp.kernel_size, sp.pool_type)
    cand = jnp.arange(scores.shape[-1]) < start[:, None, None]
    vals, cols = lax.top_k(jnp.where(cand, pooled, -jnp.inf), sp.vertical)
    rows = sparse_rows[:, None, None]
    return jnp.where(rows, cols, jnp.arange(sp.vertical)), jnp.where(rows, vals > -jnp.inf, True)


def band_start(i, window: int):
    """First band key of query index ``i``: ``max(0, 64⌊i/64⌋ - window)``."""
    return jnp.maximum(0, (i // BLOCK) * BLOCK - window)


def causal_rows(positions, rows):
    """``[B, R, T]``: key ``j`` is a valid token at or before query ``rows[b, r]`` (by position)."""
    q = jnp.take_along_axis(positions, rows, axis=1)
    return (positions[:, None, :] >= 0) & (positions[:, None, :] <= q[:, :, None])


def vertical_slash_mask(positions, cols, valid, window: int):
    """The full mask ``[B, Hkv, T, T]``: causal by ``positions [B, T]`` (padding excluded) ∧ (band ∨ a valid
    vertical column left of the band)."""
    B, T = positions.shape
    keys = jnp.arange(T)
    left = keys[None, :] < band_start(keys, window)[:, None]  # [T, T]: key j is left of row i's band
    is_vertical = ((cols[..., None] == keys) & valid[..., None]).any(axis=2)  # [B, Hkv, T]
    causal = causal_rows(positions, jnp.broadcast_to(keys, (B, T)))
    return causal[:, None] & (~left[None, None] | is_vertical[:, :, None, :])


def group_scores(q, k):
    """fp32 scores ``[B, Hk, G, R, S]`` of queries ``q [B, Hk, G, R, hd]`` against keys ``k [B, Hk, S, hd]``. The
    ``G`` query heads of a kv head and their ``R`` rows are merged into one ``G * R`` row axis first (free:
    contiguous): with two free lhs axes XLA:CPU copies a transposed ``[hd, S]`` version of the keys before every
    dot — the whole cache, every layer, every decode step — while the merged dot reads them as stored."""
    B, Hk, G, R, hd = q.shape
    s = jnp.einsum("bhrd,bhsd->bhrs", q.reshape(B, Hk, G * R, hd), k, preferred_element_type=jnp.float32)
    return s.reshape(B, Hk, G, R, k.shape[2])


def group_values(p, v, preferred_element_type=None):
    """``p [B, Hk, G, R, S]`` weights times values ``v [B, Hk, S, hd]`` -> ``[B, Hk, G, R, hd]``, rows merged as in
    ``group_scores``."""
    B, Hk, G, R, S = p.shape
    out = jnp.einsum("bhrs,bhsd->bhrd", p.reshape(B, Hk, G * R, S), v, preferred_element_type=preferred_element_type)
    return out.reshape(B, Hk, G, R, v.shape[-1])


def masked_attention(qg, kn, vn, mask, dtype):
    """Dense attention of ``qg [B, Hkv, G, T, hd]`` (pre-scaled) to ``kn, vn [B, Hkv, T, hd]`` under a per
    kv-head ``mask [B, Hkv, T, T]``; fp32 softmax. Returns ``[B, Hkv, G, T, hd]``."""
    s = group_scores(qg, kn)
    s = jnp.where(mask[:, :, None], s, MASK_VALUE)
    p = jnp.exp(s - s.max(-1, keepdims=True))
    out = group_values(p.astype(dtype), vn)
    return out / p.sum(-1, keepdims=True).astype(out.dtype)


def blocked_attention(qg, kn, vn, positions, cols, valid, window: int, chunk: int, dtype):
    """``masked_attention`` under ``vertical_slash_mask`` without the ``[T, T]`` mask or scores.

    Chunk ``c`` (query rows ``[r, r + chunk)``, ``r = c * chunk``) attends to the keys ``[r - window, r +
    chunk)`` — every row's band lies inside, from ``band_start(r)`` on — masked per row to its own band and
    causally by position, and to the gathered vertical columns masked to those left of the row's band. The
    two key sets are disjoint, so no key enters a softmax twice. Keys are left-padded by ``window`` (with
    position -1) so that the band slice has a static size. fp32 softmax over both parts jointly.
    """
    B, Hk, G, T, hd = qg.shape
    c = min(chunk, -(-T // BLOCK) * BLOCK)
    n_chunks = -(-T // c)
    pad = n_chunks * c - T
    q = jnp.pad(qg, ((0, 0),) * 3 + ((0, pad), (0, 0)))
    qpos = jnp.pad(positions, ((0, 0), (0, pad)), constant_values=-1)
    k = jnp.pad(kn, ((0, 0), (0, 0), (window, pad), (0, 0)))
    v = jnp.pad(vn, ((0, 0), (0, 0), (window, pad), (0, 0)))
    kpos = jnp.pad(positions, ((0, 0), (window, pad)), constant_values=-1)
    vk = jnp.take_along_axis(kn, cols[..., None], axis=2)  # [B, Hk, V, hd]
    vv = jnp.take_along_axis(vn, cols[..., None], axis=2)
    vpos = jnp.take_along_axis(jnp.broadcast_to(positions[:, None], (B, Hk, T)), cols, axis=2)
    vok = valid & (vpos >= 0)

    def step(ci):
        r = ci * c
        qc = lax.dynamic_slice_in_dim(q, r, c, axis=3)  # [B, Hk, G, c, hd]
        qp = lax.dynamic_slice_in_dim(qpos, r, c, axis=1)  # [B, c]
        kc = lax.dynamic_slice_in_dim(k, r, window + c, axis=2)  # keys r - window .. r + c - 1
        vc = lax.dynamic_slice_in_dim(v, r, window + c, axis=2)
        kp = lax.dynamic_slice_in_dim(kpos, r, window + c, axis=1)
        first = band_start(r + jnp.arange(c), window)  # [c]
        keys = r - window + jnp.arange(window + c)
        band = ((keys[None, :] >= first[:, None])[None] & (kp[:, None, :] >= 0)
                & (kp[:, None, :] <= qp[:, :, None]))  # [B, c, window + c]
        vert = (vok[:, :, None, :] & (cols[:, :, None, :] < first[None, None, :, None])
                & (vpos[:, :, None, :] <= qp[:, None, :, None]))  # [B, Hk, c, V]
        sb = group_scores(qc, kc)
        sb = jnp.where(band[:, None, None], sb, MASK_VALUE)
        sv = group_scores(qc, vk)
        sv = jnp.where(vert[:, :, None], sv, MASK_VALUE)
        m = jnp.maximum(sb.max(-1, keepdims=True), sv.max(-1, keepdims=True))
        pb, pv = jnp.exp(sb - m), jnp.exp(sv - m)
        out = group_values(pb.astype(dtype), vc) + group_values(pv.astype(dtype), vv)
        return out / (pb.sum(-1, keepdims=True) + pv.sum(-1, keepdims=True)).astype(out.dtype)

    out = lax.map(step, jnp.arange(n_chunks))  # [n_chunks, B, Hk, G, c, hd]
    return jnp.moveaxis(out, 0, 3).reshape(B, Hk, G, n_chunks * c, hd)[:, :, :, :T]
