"""KV-compression methods on tiny random models: the kept entries are exactly the top-scoring ones of a
plain numpy reference of each method's score, computed from transformers' attention probabilities
(batch rows of different lengths, each scored alone); budgets, windows, positions, skipping, errors,
reuse, one compile per bucket, API and CLI."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from conftest import hf_attentions
from jaxspec.api import COMPILED, InputError
from jaxspec.cli import main
from jaxspec.kv import (METHODS, AdaKV, H2O, PyramidKV, SnapKV, SpecKV, SpecKVOracle, StreamingLLM,
                        accounting, compress, decode, make_method)
from jaxspec.kv.pyramidkv import pyramid_budgets
from jaxspec.models import forward
from jaxspec.cache import KVCache

C, W, K = 16, 4, 3  # capacity, window, pooling kernel used throughout
LENGTHS = (40, 12, 57)  # the middle row fits in the capacity


@pytest.fixture(scope="module")
def target(qwen_with_eager_reference):
    return qwen_with_eager_reference


@pytest.fixture(scope="module")
def draft(llama_same_vocabulary):
    return llama_same_vocabulary


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(3, 101, n).tolist() for n in LENGTHS]


def grouped(a, hkv):
    """[L, Hq, ...] -> [L, Hkv, G, ...]"""
    return a.reshape(a.shape[0], hkv, a.shape[1] // hkv, *a.shape[2:])


def np_pool(x, k):
    return np.stack([x[..., max(0, j - k // 2): j + k // 2 + 1].max(-1) for j in range(x.shape[-1])], -1)


def top(score, budget):
    """Positions of the ``budget`` highest scores, ties to the lowest position."""
    return sorted(sorted(range(len(score)), key=lambda j: (-score[j], j))[:budget])


def kept(target, prompts, kv, draft=None, **kw):
    c = compress(target, prompts, kv, draft=draft, **kw)
    return c, [r["kept_indices"] for r in accounting(c, target.config, kept_indices=True)]


def snap_score(ref, ids, hkv, rows, cand, reduce):
    """Pooled window score [L, Hkv, cand]: probabilities of query ``rows``, reduced over group and rows."""
    a = grouped(hf_attentions(ref, ids)[:, :, rows, :cand], hkv)  # [L, Hkv, G, rows, cand]
    s = a.max((2, 3)) if reduce == "max" else a.mean((2, 3))
    return np_pool(s, K)


def check_rows(got, prompts, expect):
    """expect(b, n, l, h) -> sorted kept positions; rows that fit in C keep everything."""
    for b, ids in enumerate(prompts):
        n = len(ids)
        for l, layer in enumerate(got[b]):
            for h, idx in enumerate(layer):
                assert idx == (list(range(n)) if n <= C else expect(b, n, l, h)), (b, l, h)


def test_snapkv_keeps_the_top_scoring_entries(target, prompts):
    model, ref = target
    hkv = model.config.num_kv_heads
    _, got = kept(model, prompts, SnapKV(capacity=C, window_size=W, kernel_size=K))
    scores = {b: snap_score(ref, p, hkv, slice(len(p) - W, len(p)), len(p) - W, "mean") for b, p in enumerate(prompts)}
    check_rows(got, prompts, lambda b, n, l, h: sorted(top(scores[b][l, h], C - W) + list(range(n - W, n))))
    assert all(len(got[b][l]) == hkv for b in range(3) for l in range(2))  # one selection per kv head


def test_h2o_keeps_the_heaviest_columns(target, prompts):
    model, ref = target
    _, got = kept(model, prompts, H2O(capacity=C, window_size=W))

    def expect(b, n, l, h):
        s = grouped(hf_attentions(ref, prompts[b]), model.config.num_kv_heads).sum(3).mean(2)  # column sums
        return sorted(top(s[l, h, : n - W], C - W) + list(range(n - W, n)))

    check_rows(got, prompts, expect)


def test_streamingllm_keeps_sinks_and_recent(target, prompts):
    model, _ = target
    _, got = kept(model, prompts, StreamingLLM(capacity=C, sink_size=3))
    check_rows(got, prompts, lambda b, n, l, h: [0, 1, 2] + list(range(n - C + 3, n)))


def np_pyramid(n, L, B, W, beta):
    lo = B // beta
    hi = 2 * B - lo
    if hi >= n - W:
        hi, lo = n - W, 2 * B - (n - W)
    f = [hi - l * (hi - lo) / (L - 1) for l in range(L)]
    cum = np.floor(np.concatenate([[0], np.cumsum(f)]) + 0.5).astype(int)
    return np.diff(cum), f


@pytest.mark.parametrize("L,B,n", [(28, 224, 5000), (28, 224, 300), (24, 96, 200), (2, 12, 60), (7, 50, 90)])
def test_pyramid_schedule_sums_to_the_mean_budget(L, B, n):  # compressed rows: n - window >= B
    got = np.asarray(pyramid_budgets(jnp.array([n]), L, B, 32, 20))[:, 0]
    ref, real = np_pyramid(n, L, B, 32, 20)
    assert got.tolist() == ref.tolist()
    assert got.sum() == L * B
    assert (np.abs(got - real) <= 1).all()
    assert (np.diff(got) <= 0).all() and got[0] <= n - 32


def test_pyramidkv_keeps_top_per_layer_budget(target, prompts):
    model, ref = target
    hkv = model.config.num_kv_heads
    _, got = kept(model, prompts, PyramidKV(capacity=C, window_size=W, kernel_size=K, beta=4))
    scores = {b: snap_score(ref, p, hkv, slice(len(p) - W, len(p)), len(p) - W, "mean") for b, p in enumerate(prompts)}

    def expect(b, n, l, h):
        return sorted(top(scores[b][l, h], np_pyramid(n, 2, C - W, W, 4)[0][l]) + list(range(n - W, n)))

    check_rows(got, prompts, expect)
    assert [len(x) for x in got[0][0]] == [W + 2 * (C - W) - (C - W) // 4] * hkv  # the schedule, met exactly


def test_adakv_budgets_with_floor(target, prompts):
    model, ref = target
    hkv = model.config.num_kv_heads
    B, alpha = C - W, 0.2
    _, got = kept(model, prompts, AdaKV(capacity=C, window_size=W, kernel_size=K, floor_alpha=alpha))
    for b, ids in enumerate(prompts):
        n = len(ids)
        if n <= C:
            continue
        s = snap_score(ref, ids, hkv, slice(n - W, n), n - W, "mean")  # [L, Hkv, n - W]
        for l in range(2):
            flat = [(-s[l, h, j], h, j) for h in range(hkv) for j in range(n - W)]
            wins = np.bincount([h for _, h, _ in sorted(flat)[: hkv * B]], minlength=hkv)
            budgets = np.round(wins * (1 - alpha) + int(B * alpha)).astype(int)
            for h in range(hkv):
                assert got[b][l][h] == sorted(top(s[l, h], budgets[h]) + list(range(n - W, n))), (b, l, h)


def test_speckv_scores_prompt_and_lookahead_queries(target, draft, prompts):
    model, ref = target
    hkv = model.config.num_kv_heads
    free = jaxspec.generate(draft, prompts, max_new_tokens=6, stop_ids=[])[0].token_ids
    stop = [free[2]]  # row 0's lookahead ends early at this id (kept)
    c, got = kept(model, prompts, SpecKV(capacity=C, window_size=W, kernel_size=K), draft=draft,
                  max_new_tokens=6, stop_ids=stop)
    greedy = jaxspec.generate(draft, prompts, max_new_tokens=6, stop_ids=stop)
    assert c.lookahead == [r.token_ids for r in greedy]  # the lookahead is the draft's greedy continuation
    assert c.lookahead[0] == free[: free.index(stop[0]) + 1]

    def expect(b, n, l, h):
        ids = prompts[b] + c.lookahead[b]
        s = snap_score(ref, ids, hkv, slice(n - W - 1, len(ids)), n - W - 1, "max")
        return sorted(top(s[l, h], C - W) + list(range(n - W - 1, n)))  # window + the re-fed final token

    check_rows(got, prompts, expect)


def test_speckv_oracle_uses_the_targets_own_answer(target, prompts):
    model, _ = target
    c = compress(model, prompts, SpecKVOracle(capacity=C, window_size=W, kernel_size=K), max_new_tokens=5)
    assert c.lookahead == [r.token_ids for r in jaxspec.generate(model, prompts, max_new_tokens=5, stop_ids=[])]


def test_compressed_cache_keeps_original_positions_and_entries(target, prompts):
    model, _ = target
    cfg = model.config
    c = compress(model, prompts, SnapKV(capacity=C, window_size=W, kernel_size=K))
    T = 64
    tokens = np.zeros((3, T), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    pos = np.where(np.arange(T) < np.array(LENGTHS)[:, None], np.arange(T), -1)
    _, full, _ = forward(model.params, cfg, jnp.asarray(tokens), jnp.asarray(pos), KVCache.create(cfg, 3, T))
    kpos = np.asarray(c.cache.pos)
    ck, fk = np.asarray(c.cache.k), np.asarray(full.k)
    for l, b, h in np.ndindex(*kpos.shape[:3]):
        p = kpos[l, b, h]
        # the prefill with its attention capture and the plain forward are different XLA programs: fp32
        # rounding differs (by up to ~1e-6 here), a wrong gather by O(1)
        np.testing.assert_allclose(ck[l, b, h, p >= 0], fk[l, b, h, p[p >= 0]], rtol=1e-5, atol=1e-5)
        assert (np.asarray(c.cache.k)[l, b, h, p < 0] == 0).all()
    assert np.asarray(c.next_pos).tolist() == list(LENGTHS)


@pytest.mark.parametrize("kv", [SnapKV(capacity=C, window_size=W, kernel_size=K),
                                AdaKV(capacity=C, window_size=9, kernel_size=K, reduction_type="max"),
                                SpecKV(capacity=C, window_size=W, kernel_size=K)], ids=lambda m: m.name)
def test_suffix_scores_equal_the_one_pass_capture(target, prompts, kv):
    """``score_suffix`` (the captured rows fed again on the plain prefill's cache) gives the one-pass
    ``prefill`` capture's scores on every prompt slot, for rows of different lengths, a row shorter than the
    window (captured rows at negative positions) and lookaheads of different lengths."""
    from jaxspec.generation import pad_prompts
    from jaxspec.kv.full import Full
    from jaxspec.kv.pipeline import prefill, rescore, score_suffix

    model, _ = target
    cfg = model.config
    rows = prompts + [prompts[0][:5]]
    batch = pad_prompts(rows, 0)
    B, T = batch.tokens.shape
    look = look_len = None
    if kv.lookahead:
        look = jnp.asarray(np.random.default_rng(5).integers(3, 101, (B, 8)), jnp.int32)
        look_len = jnp.asarray([8, 3, 5, 1], jnp.int32)
    Ls = 0 if look is None else look.shape[1]
    assert rescore(kv, batch.lengths, look_len, Ls, T)
    _, _, want = prefill(model.params, batch.tokens, batch.lengths, look, look_len,
                                  KVCache.create(cfg, B, T + Ls), cfg=cfg, method=kv)
    _, plain, _ = prefill(model.params, batch.tokens, batch.lengths, None, None, KVCache.create(cfg, B, T), cfg=cfg,
                          method=Full())
    got = score_suffix(model.params, plain, batch.tokens, batch.lengths, look, look_len, cfg=cfg, method=kv)
    assert got.shape == want.shape[:3] + (T,)
    for b, ids in enumerate(rows):
        np.testing.assert_allclose(np.asarray(got[:, b, :, : len(ids)]), np.asarray(want[:, b, :, : len(ids)]),
                                   rtol=1e-5, atol=1e-6)
        assert np.asarray(got[:, b, :, : len(ids)]).sum() > 0


@pytest.mark.parametrize("name", [m for m in METHODS if m != "full"])
def test_capacity_covering_the_prompt_equals_full_and_skips_the_draft(target, draft, prompts, name):
    model, _ = target
    kv = make_method(name, capacity=64, **({} if name == "streamingllm" else {"window_size": W}))
    base = jaxspec.generate(model, prompts, max_new_tokens=6, stop_ids=[])
    res = jaxspec.generate(model, prompts, max_new_tokens=6, stop_ids=[], kv=kv,
                           draft=draft if kv.needs_draft else None)
    assert [r.token_ids for r in res] == [r.token_ids for r in base]
    assert not any(r.kv["compressed"] for r in res)
    assert all(r.timings["draft"] == 0 and "lookahead_tokens" not in r.kv for r in res)
    assert [r.kv["kept_per_layer"] for r in res] == [[n, n] for n in LENGTHS]


def test_row_that_fits_is_not_compressed_in_a_mixed_batch(target, draft, prompts):
    model, _ = target
    base = jaxspec.generate(model, prompts[1], max_new_tokens=6, stop_ids=[])
    for kv in (SnapKV(capacity=C, window_size=W, kernel_size=K), SpecKV(capacity=C, window_size=W, kernel_size=K)):
        res = jaxspec.generate(model, prompts, max_new_tokens=6, stop_ids=[], kv=kv,
                               draft=draft if kv.needs_draft else None)
        assert [r.kv["compressed"] for r in res] == [True, False, True]
        assert res[1].token_ids == base.token_ids
        extra = 1 if kv.lookahead else 0  # SpecKV re-feeds the final prompt token
        assert res[0].kv["kept_per_layer"] == [C + extra] * 2
        assert res[0].kv["kv_bytes_kept"] < res[0].kv["kv_bytes_full"]


def test_compressed_prompt_decodes_repeatedly_and_compiles_once_per_bucket(target, prompts):
    model, _ = target
    kv = SnapKV(capacity=C, window_size=W, kernel_size=K)
    c = compress(model, prompts, kv)
    a, _, _ = decode(model, c, max_new_tokens=5)
    b, _, _ = decode(model, c, max_new_tokens=5)
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    jaxspec.generate(model, prompts, max_new_tokens=5, stop_ids=[], kv=kv)
    before = len(COMPILED)
    rng = np.random.default_rng(1)
    other = [rng.integers(3, 101, n).tolist() for n in (50, 33, 20)]  # same bucket (64)
    jaxspec.generate(model, other, max_new_tokens=7, stop_ids=[], kv=kv)
    assert len(COMPILED) == before


@pytest.mark.parametrize("make,match", [
    (lambda: SnapKV(capacity=8, window_size=8), "larger than window_size"),
    (lambda: SnapKV(capacity=16, window_size=4, kernel_size=4), "kernel_size must be odd"),
    (lambda: SpecKV(capacity=5000), "prefill_window_size"),
    (lambda: SpecKV(pool_type="avg"), "pool_type"),
    (lambda: SpecKV(prefill_vertical_size=-1), "prefill_vertical_size must be >= 0"),
    (lambda: StreamingLLM(capacity=4, sink_size=4), "sink_size"),
    (lambda: make_method("nope"), "unknown kv method"),
    (lambda: make_method("h2o", kernel_size=3), "no parameter kernel_size"),
])
def test_bad_configs_are_refused(make, match):
    with pytest.raises(InputError, match=match):
        make()


def test_draft_errors(target, draft, prompts):
    model, _ = target
    with pytest.raises(InputError, match="needs a draft"):
        jaxspec.generate(model, prompts, kv="speckv")
    with pytest.raises(InputError, match="does not use a draft"):
        jaxspec.generate(model, prompts, kv="snapkv", draft=draft)
    other = dataclasses.replace(draft, config=draft.config.replace(vocab_size=102))
    with pytest.raises(InputError, match="vocabularies differ"):
        jaxspec.generate(model, prompts, kv=SpecKV(capacity=C, window_size=W), draft=other)


def test_cli_methods_and_kv_json(target, tiny_hf, capsys):
    assert main(["methods", "--json"]) == 0
    sections = json.loads(capsys.readouterr().out)
    listed = {m["name"]: m for m in sections["kv"]}
    assert set(listed) == set(METHODS) and listed["speckv"]["params"]["kernel_size"] == 7
    assert {m["name"] for m in sections["pc"]} == {"specpc", "specprefill", "draft-ppl", "recency", "random"}
    drafters = {m["name"]: m for m in sections["speculative"]}
    assert set(drafters) == {"aded", "ngram", "draft-model"} and drafters["aded"]["params"]["c1"] == 32.0
    assert drafters["draft-model"]["needs_draft"] and "table" not in drafters["aded"]["params"]
    d, _ = tiny_hf("qwen2-bias")
    ids = ",".join(map(str, range(3, 43)))
    assert main(["generate", "--model", str(d), "--prompt-ids", ids, "--max-new-tokens", "4", "--stop-ids", "",
                 "--kv", "snapkv", "--capacity", str(C), "--window", str(W), "--kernel-size", str(K),
                 "--kept-indices", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv"]["compressed"] and out["kv"]["kept_per_layer"] == [C, C]
    assert len(out["kv"]["kept_indices"][0][0]) == C
    assert {"draft", "prefill", "score", "decode"} <= set(out["timings"])
    assert main(["generate", "--model", str(d), "--prompt-ids", ids, "--kv", "speckv"]) == 2
    assert "needs a draft" in capsys.readouterr().err


@pytest.mark.real
def test_real_needle_qwen_coder_draft_to_target(capsys):
    """Qwen2.5-Coder 0.5B draft -> 1.5B target, a ~1K-token needle prompt, capacity 64: ``full`` and
    ``speckv`` retrieve the needle; what every baseline answers is printed (run with -s)."""
    from experiments.bench_kv import ANSWER, needle_prompt

    target = jaxspec.load("qwen2.5-coder-1.5b-instruct", quiet=True)
    draft = jaxspec.load("qwen2.5-coder-0.5b-instruct", quiet=True)
    prompt = needle_prompt(target.tokenizer, 1000)
    answers = {}
    for name in METHODS:
        kv = make_method(name, **({} if name == "full" else {"capacity": 64}))
        r = jaxspec.generate(target, prompt, max_new_tokens=12, kv=kv, draft=draft if kv.needs_draft else None)
        answers[name] = r.text
    with capsys.disabled():
        print(f"\nneedle test, {len(prompt)} prompt tokens, capacity 64:")
        for name, text in answers.items():
            print(f"  {name:<14} {'found' if ANSWER in text else 'MISSED':<7} {text!r}")
    assert ANSWER in answers["full"] and ANSWER in answers["speckv"]
