"""Small-M matmul against one weight matrix in both storage layouts, on this JAX build.

    python -m experiments.bench_matmul_layout [--rows 1 2 5 9 16] [--shape 8960 1536] [--out run.json]

Decoding multiplies 1 activation row by every weight matrix; speculative verification multiplies 2–65 rows.
Which layout XLA:CPU serves well differs between the two (docs/results.md, speculative decoding), so this
times ``x[M, in] @ W[out, in]ᵀ`` (our stored layout) and ``x[M, in] @ W[in, out]`` for each M, best of 20.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def best_seconds(fn, *args, repeats: int = 20) -> float:
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 5, 9, 16, 32])
    ap.add_argument("--shape", type=int, nargs=2, default=[8960, 1536], metavar=("OUT", "IN"),
                    help="weight shape (default: Qwen2.5-1.5B's MLP up projection)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    from experiments.bench_generate import emit, machine_info

    out_dim, in_dim = args.shape
    w = np.random.default_rng(0).standard_normal((out_dim, in_dim), np.float32)
    w_out_in, w_in_out = jnp.asarray(w), jnp.asarray(w.T.copy())
    ours = jax.jit(lambda x, w: jnp.einsum("mi,oi->mo", x, w))
    other = jax.jit(lambda x, w: x @ w)
    rows = []
    for m in args.rows:
        x = jnp.ones((m, in_dim), jnp.float32)
        a, b = best_seconds(ours, x, w_out_in), best_seconds(other, x, w_in_out)
        rows.append({"rows": m, "out_in_ms": 1e3 * a, "in_out_ms": 1e3 * b,
                     "out_in_GBps": w.nbytes / a / 1e9, "in_out_GBps": w.nbytes / b / 1e9})
        print(f"M={m:3d}  W[out,in]: {1e3 * a:6.2f} ms   W[in,out]: {1e3 * b:6.2f} ms", file=sys.stderr)
    result = {"benchmark": "matmul_layout", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": "python -m experiments.bench_matmul_layout " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(), "weight_shape": [out_dim, in_dim], "results": rows}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
