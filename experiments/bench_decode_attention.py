"""What the CPU decode-attention kernels save per decode step, by context length (paired, one process).

    python -m experiments.bench_decode_attention --model qwen2.5-coder-0.5b-instruct [--context 1024 4096 8192]
        [--steps 32] [--repeats 4] [--out run.json]

For each context length S, a cache of capacity S is filled with S - 64 random keys and values (attention
cost depends on the slots read, not on what they hold) and the jitted decode loop (``decode_loop``, greedy,
``--steps`` tokens) is compiled twice: with the attention kernels (``cpu_kernels.cache_scores`` and
``cache_values``, the default on CPU) and with XLA's dots for attention (``ATTN_ROWS_MAX = 0``; the small-row
projection kernel stays on in both). The two programs run alternately ``--repeats`` times; a step's time is
the loop's time over ``steps - 1`` (the first token comes from the given logits). Reported: best ms a step of
each, their ratio, and the bandwidth roofline of one step (weights + the KV bytes read, over the mat-vec
bandwidth measured in the same run). Both programs must emit the same tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 8192], help="cache capacities")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxspec
    from experiments.bench_generate import emit, machine_info, measure_roofline
    from jaxspec.cache import KVCache
    from jaxspec.generation import Sampling, decode_loop
    from jaxspec.models import cpu_kernels

    os.environ["JAXSPEC_CPU_KERNELS"] = "1"  # compared with XLA on any CPU, also where they are off by default
    if not cpu_kernels.load():
        sys.exit(f"the CPU kernels are unavailable: {cpu_kernels._state['error']}")
    model = jaxspec.load(args.model, quiet=True)
    cfg, params = model.config, model.params
    roof = measure_roofline()
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    rows = []
    for S in args.context:
        fill = S - 64
        rng = np.random.default_rng(0)
        shape = (cfg.num_layers, 1, cfg.num_kv_heads, S, cfg.head_dim)
        pos = np.broadcast_to(np.where(np.arange(S) < fill, np.arange(S), -1).astype(np.int32), shape[:-1])
        cache = KVCache(k=jnp.asarray(rng.standard_normal(shape, np.float32)),
                        v=jnp.asarray(rng.standard_normal(shape, np.float32)),
                        pos=jnp.asarray(pos), length=jnp.asarray([fill], jnp.int32))
        logits = jnp.zeros((1, cfg.vocab_size), jnp.float32).at[0, 100].set(1.0)

        def run(params, cache, logits):  # params an argument: closed over, they would be compiled in as constants
            return decode_loop(params, cfg, cache, logits, jnp.asarray([fill], jnp.int32), jax.random.key(0),
                               args.steps, jnp.asarray([-1], jnp.int32), Sampling(0.0, 0, 1.0),
                               max_steps=args.steps).tokens

        programs = {}
        saved = cpu_kernels.ATTN_ROWS_MAX
        for name, limit in (("kernels", saved), ("xla", 0)):
            cpu_kernels.ATTN_ROWS_MAX = limit
            jax.clear_caches()  # the inner jitted forward is traced anew under this limit
            programs[name] = jax.jit(lambda *a: run(*a)).lower(params, cache, logits).compile()
        cpu_kernels.ATTN_ROWS_MAX = saved
        if cpu_kernels.SCORES not in programs["kernels"].as_text() or cpu_kernels.SCORES in programs["xla"].as_text():
            sys.exit("the two programs do not differ in the attention kernels")
        tokens = {k: np.asarray(p(params, cache, logits)) for k, p in programs.items()}
        if not (tokens["kernels"] == tokens["xla"]).all():
            sys.exit(f"S={S}: the kernels changed the greedy tokens")
        times = {k: [] for k in programs}
        for _ in range(args.repeats):
            for k, p in programs.items():
                t0 = time.perf_counter()
                p(params, cache, logits).block_until_ready()
                times[k].append((time.perf_counter() - t0) / (args.steps - 1) * 1e3)
        kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * S * cfg.head_dim * 4
        bound = (weight_bytes + kv_bytes) / (roof["matvec_GBps"] * 1e9) * 1e3
        best = {k: min(v) for k, v in times.items()}
        rows.append({"context": S, "kv_MB": kv_bytes / 1e6, "step_bound_ms": bound,
                     "kernels_ms": best["kernels"], "xla_ms": best["xla"], "speedup": best["xla"] / best["kernels"],
                     "kernels_vs_roofline": bound / best["kernels"], "xla_vs_roofline": bound / best["xla"],
                     "all_ms": times})
        print(f"S={S}: kernels {best['kernels']:.1f} ms, XLA {best['xla']:.1f} ms a step "
              f"({best['xla'] / best['kernels']:.2f}x), roofline {bound:.1f} ms", file=sys.stderr)

    table = ["| context | KV read MB | roofline ms | XLA dots ms (vs roofline) | kernels ms (vs roofline) | speedup |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['context']} | {r['kv_MB']:.0f} | {r['step_bound_ms']:.1f} | {r['xla_ms']:.1f} "
                     f"({r['xla_vs_roofline']:.0%}) | {r['kernels_ms']:.1f} ({r['kernels_vs_roofline']:.0%}) | "
                     f"{r['speedup']:.2f}x |")
    print("\n".join(table), file=sys.stderr)
    result = {"benchmark": "decode_attention", "model": args.model, "steps": args.steps, "repeats": args.repeats,
              "machine": machine_info(), "roofline": roof, "weight_bytes": weight_bytes, "results": rows,
              "table": "\n".join(table)}
    emit(result, args.out, stdout=False)
    return result


if __name__ == "__main__":
    main()
