"""Shared fixtures: tiny random HF models saved by transformers, and the path of ../shared/assets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_ASSETS = REPO.parent / "shared" / "assets"


def tiny_hf_configs():
    """name -> (transformers config class name, kwargs) covering every family feature we support."""
    base = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256)
    return {
        "llama-gqa4to1-tied": ("LlamaConfig", dict(base, num_key_value_heads=1, tie_word_embeddings=True)),
        "llama-gqa4to2-untied-llama3rope": ("LlamaConfig", dict(
            base, num_key_value_heads=2, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32})),
        "llama-linear-rope": ("LlamaConfig", dict(base, num_key_value_heads=2, rope_theta=500.0,
                                                  rope_scaling={"rope_type": "linear", "factor": 2.0})),
        "qwen2-bias": ("Qwen2Config", dict(base, num_key_value_heads=2, tie_word_embeddings=False)),
        "qwen3-qknorm-headdim": ("Qwen3Config", dict(base, num_key_value_heads=2, head_dim=16,
                                                     tie_word_embeddings=True)),
    }


def make_tiny_hf(name: str, out_dir: Path, seed: int = 0):
    """Build a tiny random transformers model, save it to out_dir, return the torch model."""
    import torch
    import transformers

    cls_name, kw = tiny_hf_configs()[name]
    config = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger-than-default weights so logits are not all ~0 (a weak test)
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """Callable name -> (dir, torch model), cached per session."""
    made: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in made:
            d = tmp_path_factory.mktemp(name)
            made[name] = (d, make_tiny_hf(name, d))
        return made[name]

    return get


@pytest.fixture(scope="module")
def qwen_with_eager_reference(tiny_hf):
    """The tiny qwen2 model (4 query heads, 2 kv heads, 2 layers) loaded by jaxspec, and transformers' eager
    copy of it, whose attention probabilities (``hf_attentions``) are the reference for KV and prompt selection."""
    import torch
    import transformers

    import jaxspec

    d, _ = tiny_hf("qwen2-bias")
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager", dtype=torch.float32)
    return jaxspec.load(d), ref


@pytest.fixture(scope="module")
def llama_same_vocabulary(tiny_hf):
    """A tiny llama (llama3 rope, untied) with the qwen fixture's 101-id vocabulary: the other model of a pair."""
    import jaxspec

    d, _ = tiny_hf("llama-gqa4to2-untied-llama3rope")
    return jaxspec.load(d)


def hf_attentions(ref, ids):
    """[L, Hq, N, N] attention probabilities of transformers model ``ref`` on one unpadded sequence."""
    import numpy as np
    import torch

    with torch.no_grad():
        return np.stack([a[0].numpy() for a in ref(torch.tensor([ids]), output_attentions=True).attentions])


def jaxpr_shapes(jaxpr):
    """Every intermediate's shape in ``jaxpr``, nested jaxprs (scan, map, pjit, cond branches) included: tests
    use it to prove an array of some shape (a full attention matrix) is never built."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield v.aval.shape
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from jaxpr_shapes(sub)


def shared_asset(rel: str) -> Path:
    p = SHARED_ASSETS / rel
    if not p.exists():
        pytest.skip(f"{p} absent (../shared/assets is not laid out beside this checkout)")
    return p


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """Tiny-model runs compile with LLVM's optimisation level 0: the suite compiles hundreds of small
    programs, and XLA:CPU spends most of each compile in LLVM (a speculative loop of the 2-layer test model:
    6.7 s at the default level, 4.2 s at 0), while the programs run for milliseconds. Matmuls and the
    custom kernel are library code either way; the whole suite passes, with the same tolerances, at
    both levels. A run that selects ``real`` tests (real weights, where run time dominates) keeps the
    default level."""
    from _pytest.mark.expression import Expression

    markexpr = config.getoption("markexpr", "") or ""
    if markexpr and not Expression.compile(markexpr).evaluate(lambda name, **kw: name == "real"):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilations():
    """Drop every compiled program after each test module: ``jaxspec.api.COMPILED`` and JAX's own caches
    would otherwise hold hundreds of executables (and their constants) for the whole session — the suite
    then crashed XLA:CPU inside a late compile, although every module passes on its own."""
    yield
    import jax

    from jaxspec.api import COMPILED

    COMPILED._table.clear()
    jax.clear_caches()
