"""SpecKV's vertical-slash sparse prefill (``jaxspec.models.sparse``): the mask is MInference's (a python
transliteration of its index conversion), the blocked implementation equals the dense masked reference and
never builds a [T, T] array, full coverage equals the dense prefill, the per-row switch leaves rows under
the threshold unchanged, and the kept entries match a transformers model whose attention layers run the
reference's layer-wise procedure (score, then attend sparsely)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import jaxspec
from conftest import jaxpr_shapes
from jaxspec.cache import KVCache
from jaxspec.kv import SpecKV, accounting, compress, decode
from jaxspec.models import AttnCapture, forward
from jaxspec.models.sparse import VerticalSlash, vertical_slash_mask
from jaxspec.select import query_rows

P, V, K, C, W = 64, 64, 3, 32, 4  # prefill window / vertical sizes, pooling kernel, capacity, window


@pytest.fixture(scope="module")
def target(tiny_hf):
    d, _ = tiny_hf("qwen2-bias")  # 4 query heads, 2 kv heads, 2 layers
    return jaxspec.load(d), d


@pytest.fixture(scope="module")
def draft(tiny_hf):
    """Same vocabulary; never run: the tests give the lookahead."""
    return jaxspec.load(tiny_hf("llama-gqa4to2-untied-llama3rope")[0])


def minference_mask(T, v_idx, window):
    """[T, T] keys each query row sees in MInference's ``vertical_slash_sparse_attention`` with
    ``s_idx = {window, window-64, ..., 0}``: ``convert_vertical_slash_indexes`` (a transliteration of the
    CUDA kernel) per 64-row block, then the Triton kernel's masks (causal inside blocks, columns as given)."""
    v, s = sorted(v_idx), list(range(window, -1, -64))
    mask = np.zeros((T, T), bool)
    for start_m in range(0, T, 64):
        end_m = start_m + 64
        cols, blocks = [], []
        vi, si = 1, 1
        v_cur = v[0] if v else end_m + 64
        s_cur = s[0]
        while s_cur >= end_m:
            s_cur, si = s[si], si + 1
        s_cur = max(end_m - s_cur, 64)
        lo, hi = s_cur - 64, s_cur
        while True:
            if v_cur < hi:
                if v_cur < lo:
                    cols.append(v_cur)
                v_cur, vi = (v[vi], vi + 1) if vi < len(v) else (end_m + 64, vi)
            else:
                if si >= len(s):
                    blocks += range(lo, hi, 64)
                    break
                s_cur, si = max(end_m - s[si], 64), si + 1
                if s_cur > hi + 64:
                    blocks += range(lo, hi, 64)
                    lo, hi = s_cur - 64, s_cur
                elif s_cur > hi:
                    hi += 64
        for i in range(start_m, min(end_m, T)):
            for b in blocks:
                mask[i, b: min(b + 64, i + 1)] = True
            mask[i, [c for c in cols if c < T]] = True
    return mask


@pytest.mark.parametrize("T,window,seed", [(300, 64, 0), (256, 128, 1), (200, 0, 2), (130, 192, 3)])
def test_mask_is_minferences(T, window, seed):
    rng = np.random.default_rng(seed)
    cols = np.stack([rng.permutation(T)[:40] for _ in range(3)])  # 3 heads, 40 columns each
    valid = rng.random(cols.shape) < 0.8
    positions = jnp.arange(T)[None]
    got = np.asarray(vertical_slash_mask(positions, jnp.asarray(cols)[None], jnp.asarray(valid)[None],
                                         window))[0]
    for h in range(3):
        assert (got[h] == minference_mask(T, cols[h][valid[h]].tolist(), window)).all(), h


def prefill_inputs(cfg, lengths, T, rows):
    """Right-padded random tokens, positions, and a scoring window of the last W+1 tokens per row."""
    B = len(lengths)
    n = np.array(lengths)
    tokens = jnp.asarray(np.random.default_rng(3).integers(3, cfg.vocab_size, (B, T)))
    positions = jnp.asarray(np.where(np.arange(T) < n[:, None], np.arange(T), -1))
    start = jnp.asarray(n - W - 1)
    index, weight = query_rows(start, jnp.full((B,), W + 1), W + 1, "max")
    return tokens, positions, index, weight, start, jnp.asarray(rows)


def run(model, inputs, sparse, capture=AttnCapture(W + 1, "max", "max")):
    tokens, positions, index, weight, start, rows = inputs
    cfg = model.config
    logits, cache, aux = forward(model.params, cfg, tokens, positions, KVCache.create(cfg, *tokens.shape),
                                 capture=capture, capture_index=index, capture_weight=weight, empty_cache=True,
                                 sparse=sparse, sparse_rows=None if sparse is None else rows,
                                 sparse_start=None if sparse is None else start)
    valid = np.asarray(positions) >= 0
    return np.asarray(logits)[valid], np.asarray(cache.k), np.asarray(cache.v), np.asarray(aux["attn"])


def assert_close(a, b, atol=1e-5):
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@pytest.mark.parametrize("chunk", [64, 192, 512])
@pytest.mark.parametrize("rows,pool", [((True, True), "max"), ((True, False), "mean")])
def test_blocked_equals_dense_reference(target, chunk, rows, pool):
    """Logits, every layer's K/V (the next layer's input, projected) and every layer's captured scores."""
    model, _ = target
    inputs = prefill_inputs(model.config, [300, 229], 320, rows)
    got = run(model, inputs, VerticalSlash(P, V, K, pool, chunk=chunk))
    ref = run(model, inputs, VerticalSlash(P, V, K, pool, dense_reference=True))
    assert_close(got, ref)
    dense = run(model, inputs, None)
    assert np.abs(got[3][1] - dense[3][1]).max() > 1e-3  # layer 1's scores see layer 0's sparse outputs


def test_covering_every_key_equals_the_dense_prefill(target):
    model, _ = target
    dense = run(model, prefill_inputs(model.config, [300, 229], 320, (True, True)), None)
    # every candidate is a vertical column, and every band starts before the candidates end
    assert_close(run(model, prefill_inputs(model.config, [300, 229], 320, (True, True)),
                     VerticalSlash(P, 300, K, "max", chunk=128)), dense)
    # rows left dense: the band plus columns 0 .. V-1 cover every key of a row of <= P + V tokens
    assert_close(run(model, prefill_inputs(model.config, [300, 229], 320, (False, False)),
                     VerticalSlash(P, 256, K, "max", chunk=128)), dense)


def test_blocked_prefill_never_builds_a_full_attention_matrix(target):
    model, _ = target
    T = 320
    inputs = prefill_inputs(model.config, [300, 229], T, (True, True))

    def biggest(sparse):
        jaxpr = jax.make_jaxpr(lambda p: run_traced(p, sparse))(model.params).jaxpr
        return max(s[-1] * s[-2] for s in jaxpr_shapes(jaxpr) if len(s) >= 2)

    def run_traced(params, sparse):
        tokens, positions, index, weight, start, rows = inputs
        cfg = model.config
        return forward(params, cfg, tokens, positions, KVCache.create(cfg, 2, T), capture=AttnCapture(W + 1),
                       capture_index=index, capture_weight=weight, empty_cache=True, last_only=True, sparse=sparse,
                       sparse_rows=rows, sparse_start=start)

    assert biggest(None) >= T * T  # the dense prefill has [T, T] scores
    assert biggest(VerticalSlash(P, V, K, "max", chunk=64)) < T * (P + 64 + V)


def lookahead_for(lengths, look_lengths, seed=11):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 101, n).tolist() for n in lengths]
    return prompts, [rng.integers(3, 101, m).tolist() for m in look_lengths]


def speckv(**kw):
    return SpecKV(capacity=C, window_size=W, kernel_size=K, prefill_window_size=P, prefill_vertical_size=V, **kw)


def test_below_the_threshold_nothing_changes(target, draft):
    model, _ = target
    prompts, look = lookahead_for([90, 60], [6, 3])  # buffer 96 + 8 <= P + V: the dense program
    assert speckv().sparse_prefill(jnp.array([90]), jnp.array([6]), 96 + 16) is None
    a = compress(model, prompts, speckv(), draft=draft, lookahead=look)
    b = compress(model, prompts, SpecKV(capacity=C, window_size=W, kernel_size=K), draft=draft, lookahead=look)
    for x, y in zip(jax.tree.leaves(a.cache), jax.tree.leaves(b.cache)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert np.array_equal(np.asarray(a.logits), np.asarray(b.logits))


def test_mixed_batch_equals_each_row_alone(target, draft):
    """Row 0 is over the threshold (sparse); row 1 is scored but under it (dense-equivalent pattern); row 2
    fits in the capacity but its long lookahead takes it over the threshold (unscored: dense, as the
    reference, which does not even prefill it)."""
    model, _ = target
    prompts, look = lookahead_for([280, 100, 30], [8, 5, 100])
    batch = compress(model, prompts, speckv(), draft=draft, lookahead=look)
    assert batch.compressed == [True, True, False]
    got = accounting(batch, model.config, kept_indices=True)
    out, _, _ = decode(model, batch, max_new_tokens=6)
    for b in range(3):
        alone = compress(model, prompts[b: b + 1], speckv(), draft=draft, lookahead=look[b: b + 1])
        assert accounting(alone, model.config, kept_indices=True)[0]["kept_indices"] == got[b]["kept_indices"]
        np.testing.assert_allclose(np.asarray(alone.logits)[0], np.asarray(batch.logits)[b], atol=1e-5)
        one, _, _ = decode(model, alone, max_new_tokens=6)
        assert np.asarray(one.tokens)[0].tolist() == np.asarray(out.tokens)[b].tolist()


def reference_attention(record, n, L):
    """A transformers attention function running SpecKV's layer (the reference's ``compress_kv`` + sparse
    prefill) for one unpadded sequence of prompt length ``n`` and lookahead ``L``, in torch: dense fp32
    softmax of the last W+1 prompt queries and the lookahead queries over all keys, max over group and
    queries, max-pooled; ranking I_g (ties to the lowest position); if N > P + V every query row attends to
    {j <= i: j >= max(0, 64⌊i/64⌋ - P)} ∪ {j in I_g[:V], j < max(0, 64⌊i/64⌋ - P)}. ``record[layer]`` gets
    the pooled scores."""

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        N, G = query.shape[2], module.num_key_value_groups
        k, v = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
        s = (query @ k.transpose(2, 3)) * scaling  # [1, H, N, N]
        i, j = np.arange(N)[:, None], np.arange(N)[None, :]
        causal = torch.tensor(j <= i)
        cand, rows = n - W - 1, slice(n - W - 1, N)
        a = s[0, :, rows].masked_fill(~causal[rows], float("-inf")).softmax(-1)[:, :, :cand]  # [H, W', cand]
        score = a.reshape(key.shape[1], G * a.shape[1], cand).amax(1)
        pooled = torch.nn.functional.max_pool1d(score[None], K, 1, K // 2)[0].numpy()
        record[module.layer_idx] = pooled
        allowed = np.broadcast_to(causal.numpy(), (query.shape[1], N, N)).copy()
        if N > P + V:
            left = j < np.maximum(0, (i // 64) * 64 - P)
            for g in range(key.shape[1]):
                ranking = sorted(range(cand), key=lambda c: (-pooled[g, c], c))
                vertical = np.zeros(N, bool)
                vertical[ranking[:V]] = True
                allowed[g * G: (g + 1) * G] &= ~left | vertical[None, :]
        p = s.masked_fill(~torch.tensor(allowed)[None], float("-inf")).softmax(-1)
        return (p @ v).transpose(1, 2).contiguous(), None

    return attention


@pytest.mark.parametrize("n,L", [(280, 8), (200, 12)])
def test_kept_entries_match_the_layerwise_reference(target, draft, n, L):
    model, d = target
    prompts, look = lookahead_for([n], [L], seed=n)
    record = {}
    transformers.AttentionInterface.register("speckv_reference", reference_attention(record, n, L))
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="speckv_reference",
                                                            dtype=torch.float32)
    with torch.no_grad():
        ref(torch.tensor([prompts[0] + look[0]]))
    got = accounting(compress(model, prompts, speckv(), draft=draft, lookahead=look), model.config,
                     kept_indices=True)
    for l, layer in enumerate(got[0]["kept_indices"]):
        for h, idx in enumerate(layer):
            ranking = sorted(range(n - W - 1), key=lambda c: (-record[l][h, c], c))
            assert idx == sorted(ranking[: C - W]) + list(range(n - W - 1, n)), (l, h)  # + the re-fed token
    dense = compress(model, prompts, SpecKV(capacity=C, window_size=W, kernel_size=K), draft=draft, lookahead=look)
    kept_dense = accounting(dense, model.config, kept_indices=True)[0]["kept_indices"]
    assert kept_dense[0] == got[0]["kept_indices"][0]  # layer 0 scores before any sparse attention
    assert kept_dense[1] != got[0]["kept_indices"][1]  # layer 1 scores from layer 0's sparse outputs (P16)
