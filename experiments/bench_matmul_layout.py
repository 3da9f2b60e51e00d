"""Small-M matmul on this JAX build, three ways: one matrix, and a stack of decoder layers.

    python -m experiments.bench_matmul_layout [--rows 1 2 5 9 16] [--shape 8960 1536] [--layers 4] [--out run.json]

Decoding multiplies 1 activation row by every weight matrix; speculative verification multiplies 2–65 rows.
XLA:CPU serves the two very differently (docs/results.md, speculative decoding), so this times, for each M,
best of 20: XLA's dot ``x[M, in] @ W[out, in]ᵀ`` (our stored layout), XLA's dot ``x[M, in] @ W[in, out]``,
and our small-row kernel on the stored layout (``jaxspec.models.cpu_kernels.rows_matmul``, which ``Linear``
uses for M <= ``ROWS_MAX``; the kernel is timed at every M so the crossover can be read off). First for one
matrix (``--shape``), then for the seven projections of ``--layers`` decoder layers of the Qwen2.5-1.5B
shape (``--hidden --intermediate --kv-dim``), chained as in a forward so that no variant gets a cache
advantage. The stack's figures are the ones that decide what a model step costs.
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


VARIANTS = ("out_in", "in_out", "kernel")  # XLA dot on W[out, in]; XLA dot on W[in, out]; our kernel on W[out, in]


def _mm(variant: str):
    if variant == "kernel":
        from jaxspec.models.cpu_kernels import rows_matmul

        return rows_matmul
    spec = "mi,oi->mo" if variant == "out_in" else "mi,io->mo"
    return lambda a, w: jnp.einsum(spec, a, w, precision="highest")


def layer_stack(x, layers, variant: str):
    """The projections of a decoder layer stack (attention reduced to its projections, MLP gated as in Llama)."""
    mm = _mm(variant)
    for w in layers:
        q, k, v = mm(x, w["q"]), mm(x, w["k"]), mm(x, w["v"])
        x = x + 1e-3 * mm(q, w["o"]) + 1e-6 * (k.sum() + v.sum())
        x = x + 1e-3 * mm(jax.nn.silu(mm(x, w["gate"])) * mm(x, w["up"]), w["down"])
    return x


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 5, 9, 16, 32])
    ap.add_argument("--shape", type=int, nargs=2, default=[8960, 1536], metavar=("OUT", "IN"),
                    help="single weight shape (default: Qwen2.5-1.5B's MLP up projection)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers in the stack (0: skip the stack)")
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=8960)
    ap.add_argument("--kv-dim", type=int, default=256, help="kv heads x head dim")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    from experiments.bench_generate import emit, machine_info
    from jaxspec.models import cpu_kernels

    if not cpu_kernels.load():
        raise SystemExit(f"the small-row kernel is unavailable: {cpu_kernels._state['error']}")
    rng = np.random.default_rng(0)
    out_dim, in_dim = args.shape
    w = rng.standard_normal((out_dim, in_dim), np.float32)
    w_out_in, w_in_out = jnp.asarray(w), jnp.asarray(w.T.copy())
    fns = {v: jax.jit(_mm(v)) for v in VARIANTS}
    weights = {"out_in": w_out_in, "in_out": w_in_out, "kernel": w_out_in}
    rows = []
    for m in args.rows:
        x = jnp.ones((m, in_dim), jnp.float32)
        t = {v: best_seconds(fns[v], x, weights[v]) for v in VARIANTS}
        rows.append({"rows": m, **{f"{v}_ms": 1e3 * t[v] for v in VARIANTS},
                     **{f"{v}_GBps": w.nbytes / t[v] / 1e9 for v in VARIANTS}})
        print(f"matrix M={m:3d}  " + "   ".join(f"{v}: {1e3 * t[v]:7.2f} ms" for v in VARIANTS), file=sys.stderr)

    stack = []
    if args.layers:
        h, f, kv = args.hidden, args.intermediate, args.kv_dim
        shapes = {"q": (h, h), "k": (kv, h), "v": (kv, h), "o": (h, h), "gate": (f, h), "up": (f, h), "down": (h, f)}
        out_in = [{n: (0.02 * rng.standard_normal(s, np.float32)) for n, s in shapes.items()} for _ in range(args.layers)]
        in_out = [{n: jnp.asarray(a.T.copy()) for n, a in layer.items()} for layer in out_in]
        out_in = jax.tree.map(jnp.asarray, out_in)
        nbytes = sum(a.nbytes for layer in out_in for a in layer.values())
        fns = {v: jax.jit(lambda x, ws, v=v: layer_stack(x, ws, v)) for v in VARIANTS}
        weights = {"out_in": out_in, "in_out": in_out, "kernel": out_in}
        base = None
        for m in args.rows:
            x = jnp.full((m, h), 0.1, jnp.float32)
            t = {v: best_seconds(fns[v], x, weights[v]) for v in VARIANTS}
            base = base or t["out_in"]  # XLA's mat-vec on the stored layout: a decode step's projections
            stack.append({"rows": m, **{f"{v}_ms": 1e3 * t[v] for v in VARIANTS},
                          **{f"{v}_vs_out_in_m1": t[v] / base for v in VARIANTS},
                          **{f"{v}_GBps": nbytes / t[v] / 1e9 for v in VARIANTS}})
            print(f"stack  M={m:3d}  " + "   ".join(f"{v}: {1e3 * t[v]:7.2f} ms (x{t[v] / base:.2f})"
                                                 for v in VARIANTS), file=sys.stderr)

    result = {"benchmark": "matmul_layout", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": "python -m experiments.bench_matmul_layout " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(), "weight_shape": [out_dim, in_dim], "results": rows,
              "stack": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                        "kv_dim": args.kv_dim, "results": stack}}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
