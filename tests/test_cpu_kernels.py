"""The CPU kernels (models/rows_matmul.cc via models/cpu_kernels.py) - the small-row matmul and the decode
attention's cache scores and values: exact against float64, independent of the other rows, taken where they
should be, and a clean fallback when they cannot be built."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxspec.models import cpu_kernels

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU-backend kernel")


@pytest.fixture(autouse=True)
def forced_on(monkeypatch):
    """The kernels are tested on every CPU, also where ``enabled()`` would leave them off by default
    (the attention kernels without AVX-512: slower there, not wrong)."""
    monkeypatch.setenv("JAXSPEC_CPU_KERNELS", "1")


@pytest.fixture(scope="module")
def kernel():
    if not cpu_kernels.load():
        pytest.skip(f"kernel unavailable: {cpu_kernels._state['error']}")


def test_default_follows_the_instruction_set(monkeypatch):
    """Both kernels by default with AVX-512, the matmul alone with AVX2 + FMA, none elsewhere; the variable
    overrides both."""
    monkeypatch.delenv("JAXSPEC_CPU_KERNELS")
    for flags, matmul, attention in (("flags\t: fpu sse2 avx avx2 fma", True, False),
                                     ("flags\t: fpu sse2 avx avx2", False, False),
                                     ("flags\t: fpu avx2 fma avx512f avx512bw", True, True),
                                     ("Features\t: fp asimd", False, False)):
        monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda flags=flags: flags)
        for kind, on in (("matmul", matmul), ("attention", attention)):
            assert cpu_kernels.suited(kind) is on and cpu_kernels.enabled(kind) is on, (flags, kind)
            monkeypatch.setenv("JAXSPEC_CPU_KERNELS", "1")
            assert cpu_kernels.enabled(kind)
            monkeypatch.setenv("JAXSPEC_CPU_KERNELS", "0")
            assert not cpu_kernels.enabled(kind)
            monkeypatch.delenv("JAXSPEC_CPU_KERNELS")
    with pytest.raises(ValueError, match="unknown kernel kind"):
        cpu_kernels.suited("conv")


def _ref(x, w):
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64).T


@settings(max_examples=30, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), k=st.integers(1, 80), n=st.integers(1, 300),
       seed=st.integers(0, 2**16))
def test_rows_matmul_matches_float64(kernel, lead, k, n, seed):
    """Any leading shape, K with and without a 16-lane tail, N across the 4-row blocks and the 64-row chunks
    that threads share."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    y = np.asarray(jax.jit(cpu_kernels.rows_matmul)(x, w))
    assert y.shape == (*lead, n) and y.dtype == np.float32
    np.testing.assert_allclose(y, _ref(x, w), rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_a_row_does_not_depend_on_the_others(kernel):
    """Row m's result is bit-identical whatever M is (1 row as in decode, 9 as in a tree verification, 16):
    the kernel's summation order is fixed per output element."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1536)).astype(np.float32)
    w = rng.standard_normal((1000, 1536)).astype(np.float32)
    f = jax.jit(cpu_kernels.rows_matmul)
    full = np.asarray(f(x, w))
    for m in (1, 2, 7, 9):
        np.testing.assert_array_equal(np.asarray(f(x[:m], w)), full[:m])
    np.testing.assert_array_equal(np.asarray(f(x[5:6], w)), full[5:6])


def _targets(fn, *args):
    """Kernel calls in ``fn``'s lowering (a fresh trace each time: a switch is read when tracing)."""
    return jax.jit(lambda *a: fn(*a)).lower(*args).as_text().count(cpu_kernels.TARGET)


def test_project_takes_the_kernel_for_few_fp32_rows_only(kernel, monkeypatch):
    w = jnp.ones((64, 32), jnp.float32)
    few, many = jnp.ones((2, 3, 32), jnp.float32), jnp.ones((cpu_kernels.ROWS_MAX + 1, 32), jnp.float32)
    assert _targets(cpu_kernels.project, few, w) == 1
    assert _targets(cpu_kernels.project, many, w) == 0  # prefill-sized: XLA's GEMM
    assert _targets(cpu_kernels.project, few.astype(jnp.bfloat16), w.astype(jnp.bfloat16)) == 0
    np.testing.assert_allclose(cpu_kernels.project(few, w), jnp.full((2, 3, 64), 32.0))
    monkeypatch.setenv("JAXSPEC_CPU_KERNELS", "0")
    assert _targets(cpu_kernels.project, few, w) == 0


@pytest.mark.parametrize("tied", [False, True])
def test_model_decode_uses_the_kernel(kernel, tied):
    """Every projection of a one-token step and its logits (lm_head or the tied embedding) go through the
    kernel; a prefill does not."""
    from jaxspec.cache import KVCache
    from jaxspec.models import ModelConfig, forward, init_params
    from jaxspec.models.transformer import unstack_layers

    cfg = ModelConfig("qwen2", vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=tied)
    params = unstack_layers(init_params(cfg))  # per-layer weights (the default layout): one call each
    cache = KVCache.create(cfg, 1, 32)
    step = lambda t: forward(params, cfg, t, jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape), cache)[0]  # noqa: E731
    assert _targets(step, jnp.ones((1, 1), jnp.int32)) == 7 * cfg.num_layers + 1
    assert _targets(step, jnp.ones((1, cpu_kernels.ROWS_MAX + 1), jnp.int32)) == 0


@settings(max_examples=30, deadline=None)
@given(lead=st.integers(1, 3), p=st.integers(1, 3), m=st.integers(1, 20), s=st.integers(1, 200),
       d=st.sampled_from([8, 16, 24, 64, 128]), seed=st.integers(0, 2**16))
def test_cache_scores_and_values_match_float64(kernel, lead, p, m, s, d, seed):
    """Block ``at`` of a ``[lead, P, S, D]`` buffer is read; S across the 16-key tiles and the 64-key units that
    threads share, D with and without a 16-lane tail."""
    rng = np.random.default_rng(seed)
    at = int(rng.integers(lead))
    q = rng.standard_normal((p, m, d)).astype(np.float32)
    w = rng.standard_normal((p, m, s)).astype(np.float32)
    k, v = rng.standard_normal((2, lead, p, s, d)).astype(np.float32)
    scores = np.asarray(jax.jit(cpu_kernels.cache_scores)(q, k, at))
    values = np.asarray(jax.jit(cpu_kernels.cache_values)(w, v, at))
    assert scores.shape == (p, m, s) and values.shape == (p, m, d)
    k64, v64 = k[at].astype(np.float64), v[at].astype(np.float64)
    np.testing.assert_allclose(scores, np.einsum("pmd,psd->pms", q.astype(np.float64), k64), rtol=1e-5,
                               atol=1e-5 * np.sqrt(d))
    np.testing.assert_allclose(values, np.einsum("pms,psd->pmd", w.astype(np.float64), v64), rtol=1e-5,
                               atol=1e-5 * np.sqrt(s))


def test_cache_kernels_rows_do_not_depend_on_the_others(kernel):
    """A decode step (6 rows: one token's query heads of a kv group) and a verification (54 rows) get
    bit-identical scores and values for the rows they share."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 54, 64)).astype(np.float32)
    w = rng.random((2, 54, 1000)).astype(np.float32)
    k, v = rng.standard_normal((2, 3, 2, 1000, 64)).astype(np.float32)
    scores, values = jax.jit(cpu_kernels.cache_scores), jax.jit(cpu_kernels.cache_values)
    full_s, full_v = np.asarray(scores(q, k, 1)), np.asarray(values(w, v, 1))
    for rows in (slice(0, 6), slice(6, 12), slice(48, 54)):
        np.testing.assert_array_equal(np.asarray(scores(q[:, rows], k, 1)), full_s[:, rows])
        np.testing.assert_array_equal(np.asarray(values(w[:, rows], v, 1)), full_v[:, rows])


def test_cache_kernels_reject_a_block_out_of_range(kernel):
    q, k = jnp.ones((2, 3, 16), jnp.float32), jnp.ones((2, 2, 10, 16), jnp.float32)
    with pytest.raises(Exception, match="block index out of range"):
        jax.block_until_ready(jax.jit(cpu_kernels.cache_scores)(q, k, 2))


@pytest.mark.parametrize("stacked", [False, True])
def test_model_decode_attention_reads_the_cache_through_the_kernels(kernel, monkeypatch, stacked):
    """A decode step's attention reads every layer's cache slots through the kernels (one scores and one
    values call a layer: in the scanned body for stacked weights, the layer index then traced) and gives the
    logits of XLA's dots; a prefill of more rows than ``ATTN_ROWS_MAX`` does not take them."""
    from jaxspec.cache import KVCache
    from jaxspec.models import ModelConfig, forward, init_params
    from jaxspec.models.transformer import unstack_layers

    cfg = ModelConfig("qwen2", vocab_size=97, hidden_size=64, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, qkv_bias=True)
    params = init_params(cfg, jax.random.key(0))
    params = params if stacked else unstack_layers(params)
    prompt = jax.random.randint(jax.random.key(1), (2, 40), 0, cfg.vocab_size)
    cache = forward(params, cfg, prompt, jnp.broadcast_to(jnp.arange(40), (2, 40)), KVCache.create(cfg, 2, 48))[1]

    def step(tok, cache):
        return forward(params, cfg, tok, jnp.full((2, 1), 40), cache)[0]

    def calls(fn, *args):
        text = jax.jit(lambda *a: fn(*a)).lower(*args).as_text()  # a fresh trace: the switch is read then
        return text.count(cpu_kernels.SCORES), text.count(cpu_kernels.VALUES)

    tok = jnp.array([[3], [5]], jnp.int32)
    per_program = 1 if stacked else cfg.num_layers
    assert calls(step, tok, cache) == (per_program, per_program)
    assert calls(lambda t, c: forward(params, cfg, t, jnp.broadcast_to(jnp.arange(40), (2, 40)), c)[0], prompt,
                 KVCache.create(cfg, 2, 48)) == (0, 0)
    with_kernels = np.asarray(step(tok, cache))
    monkeypatch.setenv("JAXSPEC_CPU_KERNELS", "0")
    assert calls(step, tok, cache) == (0, 0)
    np.testing.assert_allclose(with_kernels, np.asarray(step(tok, cache)), rtol=1e-5, atol=1e-5)


def test_failed_build_leaves_nothing_and_falls_back(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="failed to build"):
        cpu_kernels.build("false", tmp_path / "k.so")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(cpu_kernels, "_state", {"loaded": None, "error": None})
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C.. compiler"):
        assert cpu_kernels.load() is False
    x, w = jnp.ones((2, 8), jnp.float32), jnp.ones((4, 8), jnp.float32)
    assert _targets(cpu_kernels.project, x, w) == 0
    np.testing.assert_allclose(cpu_kernels.project(x, w), jnp.full((2, 4), 8.0))
