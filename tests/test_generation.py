"""Cache and generation invariants: cached decode == full forward, padding/batching invariance,
sampling, stop handling, cache_full, one compile per bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec.api import COMPILED
from jaxspec.cache import KVCache
from jaxspec.generation import Sampling, bucket, sample_logits
from jaxspec.models import forward


@pytest.fixture(scope="module")
def model(tiny_hf):
    d, _ = tiny_hf("qwen2-bias")
    return jaxspec.load(d)


def test_cached_decode_equals_full_forward_every_step(model):
    cfg, params = model.config, model.params
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 24)))
    full, _, _ = forward(params, cfg, ids, jnp.arange(24)[None], KVCache.create(cfg, 1, 32))
    cache = KVCache.create(cfg, 1, 32)
    logits, cache, _ = forward(params, cfg, ids[:, :8], jnp.arange(8)[None], cache)
    np.testing.assert_allclose(logits, full[:, :8], atol=1e-5)
    for t in range(8, 24):
        step, cache, _ = forward(params, cfg, ids[:, t:t + 1], jnp.array([[t]]), cache, last_only=True)
        np.testing.assert_allclose(step, full[:, t], atol=1e-5)
    assert int(cache.length[0]) == 24
    assert (np.asarray(cache.pos[:, 0, :, :24]) == np.arange(24)).all()
    assert (np.asarray(cache.pos[:, 0, :, 24:]) == -1).all()


def test_padding_is_never_written(model):
    cfg = model.config
    cache = KVCache.create(cfg, 2, 16)
    pos = jnp.array([[0, 1, 2, 3, -1, -1], [0, 1, 2, 3, 4, 5]])
    _, cache, aux = forward(model.params, cfg, jnp.ones((2, 6), jnp.int32), pos, cache)
    assert np.asarray(cache.length).tolist() == [4, 6] == np.asarray(aux["num_new"]).tolist()
    assert (np.asarray(cache.pos[:, 0, :, 4:]) == -1).all()
    assert (np.asarray(cache.k[:, 0, :, 4:]) == 0).all()


def test_batch_with_padding_equals_each_row_alone(model):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, model.config.vocab_size, n).tolist() for n in (5, 17, 11)]
    batched = jaxspec.generate(model, prompts, max_new_tokens=12, stop_ids=[])
    for p, b in zip(prompts, batched):
        alone = jaxspec.generate(model, p, max_new_tokens=12, stop_ids=[])
        assert b.token_ids == alone.token_ids
        assert b.prompt_tokens == len(p)


def test_stop_ids_end_rows_independently(model):
    p = np.random.default_rng(4).integers(3, model.config.vocab_size, 9).tolist()
    free = jaxspec.generate(model, p, max_new_tokens=10, stop_ids=[]).token_ids
    stop = free[3]
    first = free.index(stop)
    res = jaxspec.generate(model, [p, [5, 6, 7]], max_new_tokens=10, stop_ids=[stop])
    assert res[0].token_ids == free[: first + 1] and res[0].finish_reason == "stop"
    assert stop not in res[1].token_ids[:-1]


def test_cache_full_is_flagged_not_truncated(model):
    p = list(range(3, 19))  # 16 tokens: bucket 16
    res = jaxspec.generate(model, p, max_new_tokens=10, stop_ids=[], cache_capacity=20)
    # slots 16..19 hold 4 generated tokens; the 5th token is sampled from the last slot, then the cache is full
    assert res.finish_reason == "cache_full"
    assert len(res.token_ids) == 5
    free = jaxspec.generate(model, p, max_new_tokens=10, stop_ids=[])
    assert free.token_ids[:5] == res.token_ids


def test_same_bucket_does_not_recompile(model):
    jaxspec.generate(model, list(range(3, 10)), max_new_tokens=5)
    n = len(COMPILED)
    res = jaxspec.generate(model, list(range(3, 14)), max_new_tokens=7, temperature=0.7, seed=3)
    assert len(COMPILED) == n and res.timings["compile"] == 0.0
    assert bucket(7) == bucket(13) == 16 and bucket(17) == 24 and bucket(25) == 32


def test_sampling_is_seeded_and_respects_top_k(model):
    p = list(range(3, 12))
    a = jaxspec.generate(model, p, max_new_tokens=8, temperature=1.0, seed=7, stop_ids=[]).token_ids
    b = jaxspec.generate(model, p, max_new_tokens=8, temperature=1.0, seed=7, stop_ids=[]).token_ids
    c = jaxspec.generate(model, p, max_new_tokens=8, temperature=1.0, seed=8, stop_ids=[]).token_ids
    g = jaxspec.generate(model, p, max_new_tokens=8, stop_ids=[]).token_ids
    k1 = jaxspec.generate(model, p, max_new_tokens=8, temperature=1.0, top_k=1, seed=9, stop_ids=[]).token_ids
    assert a == b and a != c
    assert k1 == g  # top-k 1 is greedy


def test_sample_logits_distribution_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    s = Sampling.make(temperature=1.0, top_p=0.75)
    draws = jax.vmap(lambda k: sample_logits(logits, k, s)[0])(jax.random.split(jax.random.PRNGKey(0), 4000))
    counts = np.bincount(np.asarray(draws), minlength=4) / 4000
    # nucleus keeps {0, 1} (mass before token 2 is 0.8 >= 0.75), renormalised to 0.625 / 0.375
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] - 0.625) < 0.03


def test_greedy_ties_pick_lowest_id():
    logits = jnp.array([[0.0, 2.0, 2.0, 1.0]])
    assert int(sample_logits(logits, jax.random.PRNGKey(0), Sampling.make())[0]) == 1


def test_empty_cache_prefill_equals_general_path(model):
    cfg = model.config
    ids = jnp.asarray(np.random.default_rng(9).integers(0, cfg.vocab_size, (2, 10)))
    pos = jnp.array([list(range(10)), list(range(7)) + [-1] * 3])
    a, ca, _ = forward(model.params, cfg, ids, pos, KVCache.create(cfg, 2, 16))
    b, cb, _ = forward(model.params, cfg, ids, pos, KVCache.create(cfg, 2, 16), empty_cache=True)
    valid = np.asarray(pos) >= 0  # padding queries see no key: their outputs are don't-cares
    np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], atol=1e-5)
    np.testing.assert_allclose(ca.k, cb.k, rtol=1e-5, atol=1e-5)  # two programs: fp32 rounding differs
