"""Parity with transformers on tiny random models, fp32: logits and greedy continuations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxspec
from conftest import tiny_hf_configs
from jaxspec.cache import KVCache
from jaxspec.conversion.hf import load_hf
from jaxspec.models import forward

NAMES = sorted(tiny_hf_configs())


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(tiny_hf, name):
    d, ref_model = tiny_hf(name)
    cfg, params = load_hf(d)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ref = ref_model(torch.tensor(ids)).logits.numpy()
    logits, _, _ = forward(params, cfg, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(40), (2, 40)),
                           KVCache.create(cfg, 2, 48))
    assert np.abs(np.asarray(logits) - ref).max() <= 1e-4
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero logits


@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_transformers_generate(tiny_hf, name):
    d, ref_model = tiny_hf(name)
    model = jaxspec.load(d)
    prompt = np.random.default_rng(2).integers(3, model.config.vocab_size, 40).tolist()
    with torch.no_grad():
        ref = ref_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, 40:].tolist()
    res = jaxspec.generate(model, prompt, max_new_tokens=24, stop_ids=[])
    assert res.token_ids == ref
    assert res.finish_reason == "length"


def test_stacked_and_unstacked_layouts_agree(tiny_hf):
    from jaxspec.models.transformer import stack_layers, unstack_layers

    d, _ = tiny_hf("qwen3-qknorm-headdim")
    cfg, stacked = load_hf(d)
    flat = unstack_layers(stacked)
    assert "layers" not in flat and f"layers_{cfg.num_layers - 1}" in flat
    ids = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 12)))
    pos = jnp.arange(12)[None]
    a = forward(stacked, cfg, ids, pos, KVCache.create(cfg, 1, 16))
    b = forward(flat, cfg, ids, pos, KVCache.create(cfg, 1, 16))
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)  # same math, different XLA fusion
    np.testing.assert_allclose(a[1].k, b[1].k, atol=1e-5)
    restacked = stack_layers(flat)
    assert all(bool((x == y).all()) for x, y in zip(jax.tree.leaves(restacked), jax.tree.leaves(stacked)))
