"""The small-row CPU matmul kernel (models/rows_matmul.cc via models/cpu_kernels.py): exact against float64,
independent of the other rows, taken where it should be, and a clean fallback when it cannot be built."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxspec.models import cpu_kernels

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU-backend kernel")


@pytest.fixture(scope="module")
def kernel():
    if not cpu_kernels.load():
        pytest.skip(f"kernel unavailable: {cpu_kernels._state['error']}")


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
