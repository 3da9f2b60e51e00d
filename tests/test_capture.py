"""AttnCapture: the captured attention rows equal transformers' attention probabilities."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxspec.cache import KVCache
from jaxspec.conversion.hf import load_hf
from jaxspec.models import AttnCapture, forward


@pytest.fixture(scope="module")
def setup(tiny_hf):
    d, _ = tiny_hf("qwen2-bias")
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    cfg, params = load_hf(d)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (1, 30))
    with torch.no_grad():
        attn = ref(torch.tensor(ids), output_attentions=True).attentions  # L x [1, Hq, T, T]
    return cfg, params, ids, np.stack([a.numpy() for a in attn])  # [L, 1, Hq, T, T]


def test_rows_match_transformers_with_a_cache_prefix(setup):
    cfg, params, ids, ref = setup
    S, n0 = 32, 18  # 18 tokens already cached, 12 new
    cache = KVCache.create(cfg, 1, S)
    _, cache, _ = forward(params, cfg, jnp.asarray(ids[:, :n0]), jnp.arange(n0)[None], cache)
    rows = jnp.array([[3, 7, 11]])  # new-token indices -> absolute positions 21, 25, 29
    _, _, aux = forward(params, cfg, jnp.asarray(ids[:, n0:]), jnp.arange(n0, 30)[None], cache,
                        capture=AttnCapture(3, group="none", queries="none"), capture_index=rows)
    got = np.asarray(aux["attn"])  # [L, 1, Hq, 3, S + 12]
    assert got.shape == (cfg.num_layers, 1, cfg.num_heads, 3, S + 12)
    keys = np.concatenate([got[..., :n0], got[..., S:]], axis=-1)  # slots 0..17, then new tokens
    np.testing.assert_allclose(keys, ref[:, :, :, n0 + np.array([3, 7, 11]), :], atol=1e-5)
    assert np.abs(got[..., n0:S]).max() == 0  # empty slots get no probability


@pytest.mark.parametrize("group,queries", [("max", "max"), ("mean", "sum"), ("sum", "none")])
def test_reductions(setup, group, queries):
    cfg, params, ids, ref = setup
    rows = np.array([25, 27, 29])
    w = np.array([0.0, 0.5, 1.0], np.float32)
    _, _, aux = forward(params, cfg, jnp.asarray(ids), jnp.arange(30)[None], KVCache.create(cfg, 1, 32),
                        capture=AttnCapture(3, group=group, queries=queries),
                        capture_index=jnp.asarray(rows)[None], capture_weight=jnp.asarray(w)[None])
    r = ref[:, :, :, rows, :] * w[:, None]  # [L, 1, Hq, 3, T]
    r = r.reshape(cfg.num_layers, 1, cfg.num_kv_heads, cfg.group_size, 3, 30)
    r = {"max": np.max, "mean": np.mean, "sum": np.sum}[group](r, axis=3)
    if queries != "none":
        r = {"max": np.max, "mean": np.mean, "sum": np.sum}[queries](r, axis=3)
    np.testing.assert_allclose(np.asarray(aux["attn"])[..., 32:], r, atol=1e-5)
