"""The matmul-layout benchmark times the same computation three ways (tiny shapes, a smoke run)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench_matmul_layout import layer_stack, main
from jaxspec.models import cpu_kernels


def _need_kernel():
    if not cpu_kernels.load():
        pytest.skip(f"kernel unavailable: {cpu_kernels._state['error']}")


def test_layer_stack_variants_agree():
    _need_kernel()
    rng = np.random.default_rng(0)
    shapes = {"q": (8, 8), "k": (4, 8), "v": (4, 8), "o": (8, 8), "gate": (16, 8), "up": (16, 8), "down": (8, 16)}
    out_in = [{n: jnp.asarray(rng.standard_normal(s, np.float32)) for n, s in shapes.items()} for _ in range(2)]
    in_out = jax.tree.map(lambda a: a.T, out_in)
    x = jnp.asarray(rng.standard_normal((3, 8), np.float32))
    ref = layer_stack(x, out_in, "out_in")
    np.testing.assert_allclose(layer_stack(x, in_out, "in_out"), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer_stack(x, out_in, "kernel"), ref, rtol=1e-6, atol=1e-6)


def test_smoke_run_writes_both_tables(tmp_path):
    _need_kernel()
    out = main(["--rows", "1", "3", "--shape", "32", "16", "--layers", "1", "--hidden", "16", "--intermediate", "32",
                "--kv-dim", "8", "--out", str(tmp_path / "layout.json")])
    assert [r["rows"] for r in out["results"]] == [1, 3] and [r["rows"] for r in out["stack"]["results"]] == [1, 3]
    assert out["stack"]["results"][0]["out_in_vs_out_in_m1"] == 1.0
    assert {"out_in_ms", "in_out_ms", "kernel_ms"} <= out["results"][1].keys()
    assert (tmp_path / "layout.json").exists()
