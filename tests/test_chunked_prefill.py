"""Query-chunked causal prefill (``forward(..., prefill_chunk=c)``, ``chunked_attention``): the same logits,
cache and captured attention rows as the all-rows-at-once attention, for chunk sizes that do and do not
divide T, padded rows, a fresh or a non-empty cache, both parameter layouts, greedy continuations; and no
array spans the T axis twice once chunking is on."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jaxpr_shapes
from jaxspec.cache import KVCache
from jaxspec.generation import Sampling, decode_loop
from jaxspec.models import AttnCapture, ModelConfig, forward, init_params
from jaxspec.models.transformer import (PREFILL_CHUNK, attend, causal_mask, chunked_attention,
                                        unstack_layers)

T = 64
LENGTHS = (64, 50, 9)  # full, padded, shorter than every chunk
ROWS = np.array([[0, 31, 63], [5, 20, 49], [0, 4, 8]])  # captured query rows (valid tokens), across chunks

run = jax.jit(forward, static_argnames=("cfg", "last_only", "capture", "empty_cache", "prefill_chunk"))


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig("qwen2", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, qkv_bias=True)
    # doubled weights: peaked attention rows, so a wrong mask or normaliser shows in the logits
    params = jax.tree.map(lambda x: 2 * x, init_params(cfg, jax.random.PRNGKey(1)))
    return cfg, {"stacked": params, "unstacked": unstack_layers(params)}


def batch(cfg, lengths, T, start=0, seed=0):
    """Random tokens; positions ``start[b] + t`` for the first ``lengths[b]`` tokens, then padding."""
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (len(lengths), T)))
    t = np.arange(T)
    pos = np.where(t < np.array(lengths)[:, None], np.reshape(start, (-1, 1)) + t, -1)
    return tokens, jnp.asarray(pos)


def outputs(params, cfg, tokens, positions, cache, chunk, capture=AttnCapture(3, "none", "none"), **kw):
    weight = jnp.asarray(np.tile([1.0, 0.5, 0.25], (3, 1)), jnp.float32)
    logits, cache, aux = run(params, cfg, tokens, positions, cache, capture=capture, capture_index=jnp.asarray(ROWS),
                             capture_weight=weight, prefill_chunk=chunk, **kw)
    valid = np.asarray(positions) >= 0  # padding queries see no key: their outputs are don't-cares
    return np.asarray(logits)[valid], cache, np.asarray(aux["attn"])


def assert_same(got, ref):
    """The chunked path's online softmax adds the key blocks' fp32 terms in another order than one softmax
    over all keys: agreement to 1e-4 (the parity standard), on logits of magnitude ~5."""
    (lg, cg, ag), (lr, cr, ar) = got, ref
    assert np.abs(lr).max() > 1.0  # not a comparison of near-zero logits
    np.testing.assert_allclose(lg, lr, atol=1e-4, rtol=0)
    for x, y in zip(jax.tree.leaves(cg), jax.tree.leaves(cr)):  # K/V of every layer: the next layer's input
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-4, rtol=0)
    np.testing.assert_allclose(ag, ar, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
@pytest.mark.parametrize("chunk", [16, 24, 7])  # 4 x 16 rows; 3 x 22 (2 padded); 10 x 7 (6 padded)
@pytest.mark.parametrize("empty_cache", [True, False])
def test_fresh_prefill_equals_unchunked(model, layout, chunk, empty_cache):
    cfg, params = model
    tokens, positions = batch(cfg, LENGTHS, T)
    go = functools.partial(outputs, params[layout], cfg, tokens, positions, KVCache.create(cfg, 3, 80),
                           empty_cache=empty_cache)
    assert_same(go(chunk), go(0))


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
@pytest.mark.parametrize("capture", [AttnCapture(3, "none", "none"), AttnCapture(3, "max", "max"),
                                     AttnCapture(3, "mean", "sum")])
def test_prefill_on_a_non_empty_cache_equals_unchunked(model, layout, capture):
    """Rows hold 20, 13 and 0 cached tokens; the new tokens continue at those positions."""
    cfg, params = model
    p = params[layout]
    first, first_pos = batch(cfg, (20, 13, 0), 24, seed=1)
    _, cache, _ = run(p, cfg, first, first_pos, KVCache.create(cfg, 3, 96), prefill_chunk=0)
    tokens, positions = batch(cfg, LENGTHS, T, start=(20, 13, 0), seed=2)
    go = functools.partial(outputs, p, cfg, tokens, positions, cache, capture=capture)
    got, ref = go(16), go(0)
    assert_same(got, ref)
    assert np.asarray(got[1].length).tolist() == [84, 63, 9]


@pytest.mark.parametrize("capture", [AttnCapture(T, "mean", "sum"), AttnCapture(T, "max", "max"),
                                     AttnCapture(T, "none", "mean")])
def test_all_rows_capture_in_row_chunks_equals_unchunked(model, capture):
    """H2O's capture (every query row, padding weighted 0) is reduced chunk by chunk in a chunked prefill."""
    cfg, params = model
    tokens, positions = batch(cfg, LENGTHS, T)
    weight = jnp.asarray((np.asarray(positions) >= 0) * np.random.default_rng(4).uniform(0.5, 2, (3, T)), jnp.float32)

    def captured(chunk):
        _, _, aux = run(params["unstacked"], cfg, tokens, positions, KVCache.create(cfg, 3, 80), capture=capture,
                        capture_index=jnp.broadcast_to(jnp.arange(T), (3, T)), capture_weight=weight,
                        empty_cache=True, prefill_chunk=chunk)
        return np.asarray(aux["attn"])

    ref = captured(0)
    assert np.isfinite(ref).all() and ref.max() > 0.1
    for chunk in (16, 24):  # 4 x 16 rows; 3 x 22 rows, 2 of them padding
        np.testing.assert_allclose(captured(chunk), ref, atol=1e-5, rtol=1e-4)  # other dot shapes: fp32 order


def test_greedy_continuation_is_identical(model):
    """A prefill over the default ``PREFILL_CHUNK`` (chunked without being asked), then greedy decode."""
    cfg, params = model
    lengths = (PREFILL_CHUNK + 100, PREFILL_CHUNK - 50)
    Tp = PREFILL_CHUNK + 128
    tokens, positions = batch(cfg, lengths, Tp, seed=3)

    @functools.partial(jax.jit, static_argnames="chunk")
    def greedy(params, chunk):
        kw = {} if chunk is None else {"prefill_chunk": chunk}
        logits, cache, _ = forward(params, cfg, tokens, positions, KVCache.create(cfg, 2, Tp + 16), last_only=True,
                                   empty_cache=True, **kw)
        out = decode_loop(params, cfg, cache, logits, jnp.asarray(lengths), jax.random.PRNGKey(0), 12,
                          jnp.array([-1]), Sampling.make(), max_steps=12)
        return logits, out.tokens

    la, a = greedy(params["unstacked"], None)
    lb, b = greedy(params["unstacked"], 0)
    np.testing.assert_allclose(la, lb, atol=1e-4, rtol=0)
    assert np.asarray(a).tolist() == np.asarray(b).tolist()


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
@pytest.mark.parametrize("empty_cache", [True, False])
def test_chunked_prefill_never_spans_t_twice(model, layout, empty_cache):
    """No intermediate (scores, probabilities, masks) has two axes of length >= T: the widest is a chunk's
    ``[B, Hk, G, chunk, S + T]``. Unchunked, the ``[T, T]`` scores and mask exist."""
    cfg, params = model
    Tl = 192  # > vocab (97) and every weight dimension, so only attention can span it twice
    tokens, positions = batch(cfg, (192, 150, 9), Tl)  # capacity 200: S >= T as well

    def widest(chunk):
        def f(p):
            return forward(p, cfg, tokens, positions, KVCache.create(cfg, 3, 200), last_only=True,
                           capture=AttnCapture(3), capture_index=jnp.asarray(ROWS), empty_cache=empty_cache,
                           prefill_chunk=chunk)

        return max(sum(d >= Tl for d in s) for s in jaxpr_shapes(jax.make_jaxpr(f)(params[layout]).jaxpr))

    def widest_all_rows(chunk):  # H2O: every row captured, summed over the rows
        def f(p):
            return forward(p, cfg, tokens, positions, KVCache.create(cfg, 3, 200), last_only=True,
                           capture=AttnCapture(Tl, "mean", "sum"), capture_index=jnp.broadcast_to(jnp.arange(Tl), (3, Tl)),
                           empty_cache=empty_cache, prefill_chunk=chunk)

        return max(sum(d >= Tl for d in s) for s in jaxpr_shapes(jax.make_jaxpr(f)(params[layout]).jaxpr))

    assert widest(0) >= 2 and widest_all_rows(0) >= 2
    assert widest(32) == 1 and widest_all_rows(32) == 1


def test_pruned_prompt_positions_with_gaps(model):
    """A pruned prompt keeps its tokens' original positions (increasing, with gaps): still exact."""
    cfg, params = model
    rng = np.random.default_rng(4)
    tokens, _ = batch(cfg, LENGTHS, T, seed=4)
    pos = np.full((3, T), -1)
    for b, n in enumerate(LENGTHS):
        pos[b, :n] = np.sort(rng.choice(4 * T, n, replace=False))
    go = functools.partial(outputs, params["unstacked"], cfg, tokens, jnp.asarray(pos), KVCache.create(cfg, 3, 80),
                           empty_cache=True)
    assert_same(go(16), go(0))


def test_later_key_blocks_are_never_visited():
    """Chunk i reads key blocks 0..i only: NaN values in the last block leave every earlier chunk's rows
    finite, where attending to all keys under a mask (0 x NaN) poisons every row."""
    B, Hk, G, Tn, hd, c = 1, 2, 2, 48, 8, 16
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((B, Hk, G, Tn, hd)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, Hk, Tn, hd)), jnp.float32)
    v = np.asarray(rng.standard_normal((B, Hk, Tn, hd)), np.float32)
    v[:, :, 2 * c:] = np.nan
    positions = jnp.arange(Tn)[None]
    out = np.asarray(chunked_attention(q, k, jnp.asarray(v), positions, None, c, jnp.float32))
    assert np.isfinite(out[:, :, :, :2 * c]).all() and np.isnan(out[:, :, :, 2 * c:]).all()
    dense = np.asarray(attend(q, k, jnp.asarray(v), causal_mask(positions, positions), None, positions, jnp.float32))
    assert np.isnan(dense).all()
    v[:, :, 2 * c:] = 0.0  # and with finite values both agree
    np.testing.assert_allclose(chunked_attention(q, k, jnp.asarray(v), positions, None, c, jnp.float32),
                               attend(q, k, jnp.asarray(v), causal_mask(positions, positions), None, positions,
                                      jnp.float32), atol=1e-5)
