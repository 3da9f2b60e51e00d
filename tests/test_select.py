"""Selection primitives against plain numpy: pooling (PyTorch semantics), top-k with ties to the lowest
position, budgets as masks, gather keeping original positions, capture query rows."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

from jaxspec.cache import KVCache
from jaxspec.select import candidate_scores, gather, pool1d, query_rows, select

SETTINGS = settings(max_examples=40, deadline=None)


def np_pool(x, k, kind):
    """Loop reference: max over the in-range neighbours; mean = zero-padded sum / k."""
    out = np.empty_like(x)
    n = x.shape[-1]
    for j in range(n):
        lo, hi = max(0, j - k // 2), min(n, j + k // 2 + 1)
        out[..., j] = x[..., lo:hi].max(-1) if kind == "max" else x[..., lo:hi].sum(-1) / k
    return out


@SETTINGS
@given(n=st.integers(1, 40), k=st.sampled_from([1, 3, 5, 7]), kind=st.sampled_from(["max", "mean"]),
       seed=st.integers(0, 2**16), ties=st.booleans())
def test_pool1d_matches_numpy(n, k, kind, seed, ties):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, (2, 3, n)).astype(np.float32) if ties else rng.random((2, 3, n), np.float32)
    np.testing.assert_allclose(np.asarray(pool1d(jnp.asarray(x), k, kind)), np_pool(x, k, kind), rtol=1e-6)


@pytest.mark.parametrize("kind", ["max", "mean"])
def test_pool1d_matches_torch(kind):
    x = np.random.default_rng(0).random((3, 2, 29), np.float32)
    f = torch.nn.functional.max_pool1d if kind == "max" else torch.nn.functional.avg_pool1d
    ref = f(torch.from_numpy(x), kernel_size=7, stride=1, padding=3).numpy()
    np.testing.assert_allclose(np.asarray(pool1d(jnp.asarray(x), 7, kind)), ref, rtol=1e-6)


def test_pool1d_rejects_even_kernels():
    with pytest.raises(ValueError, match="odd"):
        pool1d(jnp.zeros((1, 8)), 4, "max")


def test_candidate_scores_pool_the_prefix_alone():
    x = np.random.default_rng(1).random((1, 2, 1, 20), np.float32)
    start = np.array([13, 6])
    got = np.asarray(candidate_scores(jnp.asarray(x), jnp.asarray(start), 5, "max"))
    for b, s in enumerate(start):
        np.testing.assert_allclose(got[0, b, 0, :s], np_pool(x[0, b, 0, :s], 5, "max"))


def test_lax_top_k_breaks_ties_toward_the_lowest_index():
    x = jnp.array([0.5, 2.0, 1.0, 2.0, 1.0, 1.0, 2.0, 1.0])
    assert lax.top_k(x, 6)[1].tolist() == [1, 3, 6, 2, 4, 5]
    assert lax.top_k(jnp.array([jnp.inf, 0.0, jnp.inf, 0.0]), 3)[1].tolist() == [0, 2, 1]


def np_select(scores, start, end, budget, k):
    """Per (layer, row, head): protected [start, end) in order, then the candidates [0, start) by score
    descending and position ascending; the first min(k, protected + budget) are kept, sorted."""
    L, B, H, N = scores.shape
    out = np.empty((L, B, H), object)
    for l, b, h in np.ndindex(L, B, H):
        cand = sorted(range(start[b]), key=lambda j: (-scores[l, b, h, j], j))
        ranked = list(range(start[b], end[b])) + cand
        out[l, b, h] = sorted(ranked[: min(k, end[b] - start[b] + budget[l, b, h])])
    return out


@SETTINGS
@given(n=st.integers(4, 32), data=st.data(), seed=st.integers(0, 2**16))
def test_select_matches_numpy(n, data, seed):
    rng = np.random.default_rng(seed)
    L, B, H = 2, 3, 2
    scores = rng.integers(0, 4, (L, B, H, n)).astype(np.float32)  # many ties
    end = rng.integers(0, n + 1, B)
    start = np.array([rng.integers(0, e + 1) for e in end])
    k = data.draw(st.integers(int((end - start).max()) or 1, n))
    budget = rng.integers(0, n + 1, (L, B, H))
    idx, keep = select(jnp.asarray(scores), jnp.asarray(start), jnp.asarray(end), jnp.asarray(budget), k)
    idx, keep = np.asarray(idx), np.asarray(keep)
    ref = np_select(scores, start, end, budget, k)
    for l, b, h in np.ndindex(L, B, H):
        m = int(keep[l, b, h].sum())
        assert keep[l, b, h, :m].all() and not keep[l, b, h, m:].any()  # kept slots first
        assert idx[l, b, h, :m].tolist() == ref[l, b, h]


@SETTINGS
@given(seed=st.integers(0, 2**16), k=st.integers(1, 12))
def test_gather_matches_numpy(seed, k):
    rng = np.random.default_rng(seed)
    L, B, H, S, hd = 2, 2, 3, 12, 4
    cache = KVCache(k=jnp.asarray(rng.random((L, B, H, S, hd), np.float32)),
                    v=jnp.asarray(rng.random((L, B, H, S, hd), np.float32)),
                    pos=jnp.asarray(np.broadcast_to(np.arange(S) * 3 + 1, (L, B, H, S)).astype(np.int32)),
                    length=jnp.full((B,), S, jnp.int32))
    idx = rng.integers(0, S, (L, B, H, k))
    keep = rng.random((L, B, H, k)) < 0.7
    out = gather(cache, jnp.asarray(idx), jnp.asarray(keep))
    ref_k = np.take_along_axis(np.asarray(cache.k), idx[..., None], axis=3)
    np.testing.assert_array_equal(np.asarray(out.k), np.where(keep[..., None], ref_k, 0))
    np.testing.assert_array_equal(np.asarray(out.pos), np.where(keep, idx * 3 + 1, -1))  # original positions
    assert np.asarray(out.length).tolist() == [k] * B


def test_query_rows_validity_and_mean_scaling():
    idx, w = query_rows(jnp.array([-2, 5]), jnp.array([4, 2]), 4, "mean")
    assert np.asarray(idx).tolist() == [[0, 0, 0, 1], [5, 6, 7, 8]]
    np.testing.assert_allclose(np.asarray(w), [[0, 0, 2, 2], [2, 2, 0, 0]])  # mean over all 4 = mean over valid
    _, w = query_rows(jnp.array([-2, 5]), jnp.array([4, 2]), 4, "max")
    np.testing.assert_allclose(np.asarray(w), [[0, 0, 1, 1], [1, 1, 0, 0]])
