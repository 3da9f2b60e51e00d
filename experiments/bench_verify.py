"""What a verification forward of T tokens costs, in decode steps, with and without the CPU small-row kernel.

    python -m experiments.bench_verify --model qwen2.5-coder-1.5b-instruct [--context 256] [--tokens 1 2 5 9 16 32]
        [--repeats 5] [--out run.json]

Speculative decoding gains only if checking T drafted tokens in one forward costs well under T decode steps.
On a cache holding ``--context`` prompt tokens, this times one jitted forward of T new tokens (causal, as a
chain-shaped tree; last-position logits for T = 1 as in decode, all T positions' logits otherwise, as
verification needs them) for each T, best of ``--repeats``, twice: with XLA's dot for every projection
(``JAXSPEC_CPU_KERNELS=0``) and with the small-row kernel (``jaxspec.models.cpu_kernels``, the default on
CPU). Each cost is reported in milliseconds and as a multiple of the same variant's 1-token step; the
bandwidth roofline of one step (weights + KV bytes over the mat-vec bandwidth measured in the same run)
anchors both.

``--loop N`` adds, for each T > 1 with the kernel, what one verification costs inside the jitted speculative
loop (``speculative_generate_tokens`` with a prompt-lookup drafter of tree size T, ``N`` new tokens on the
same prompt): ``(time for N tokens - time for 1 token) / verification steps``. Its excess over the lone
forward of T tokens is the loop's own work (drafting, acceptance, KV compaction, bookkeeping).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--context", type=int, default=256, help="prompt tokens already in the cache")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 5, 9, 16, 32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loop", type=int, default=0, metavar="N",
                    help="also time verifications inside the speculative loop, generating N tokens (0: skip)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxspec
    from experiments.bench_generate import emit, machine_info, measure_roofline
    from jaxspec.cache import KVCache
    from jaxspec.models import cpu_kernels, forward

    model = jaxspec.load(args.model, quiet=True)
    cfg, params = model.config, model.params
    cap = args.context + max(args.tokens)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(100, cfg.vocab_size // 2, (1, args.context)), jnp.int32)
    _, cache, _ = jax.jit(lambda p, t, c: forward(p, cfg, t, jnp.arange(args.context)[None], c))(
        params, prompt, KVCache.create(cfg, 1, cap))
    cache = cache.replace(length=jnp.asarray([args.context], jnp.int32))
    roof = measure_roofline()
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * args.context * cfg.head_dim * 4
    step_bound = (weight_bytes + kv_bytes) / (roof["matvec_GBps"] * 1e9)

    def timed(fn, *a):
        jax.block_until_ready(fn(*a))
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            best = min(best, time.perf_counter() - t0)
        return best

    rows = []
    for variant, flag in (("xla", "0"), ("kernel", "1")):
        os.environ["JAXSPEC_CPU_KERNELS"] = flag  # read while tracing: each variant compiles its own functions
        if flag == "1" and not cpu_kernels.load():
            raise SystemExit(f"the small-row kernel is unavailable: {cpu_kernels._state['error']}")
        base = None
        for T in args.tokens:
            toks = jnp.asarray(rng.integers(100, cfg.vocab_size // 2, (1, T)), jnp.int32)
            pos = (args.context + jnp.arange(T))[None]
            fn = jax.jit(lambda p, t, q, c, last=(T == 1): forward(p, cfg, t, q, c, last_only=last)[0])
            s = timed(fn, params, toks, pos, cache)
            base = base or s
            rows.append({"variant": variant, "tokens": T, "ms": 1e3 * s, "vs_own_step": s / base,
                         "vs_roofline_step": s / step_bound})
            print(f"{variant:6s} T={T:3d}: {1e3 * s:8.1f} ms = {s / base:5.2f} steps "
                  f"({s / step_bound:5.2f} x the roofline step)", file=sys.stderr)
    os.environ.pop("JAXSPEC_CPU_KERNELS")
    if args.loop:
        rows += loop_rows(args, cfg, params, prompt, {r["tokens"]: r["ms"] for r in rows if r["variant"] == "kernel"},
                          timed)
    result = {"benchmark": "verify", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": "python -m experiments.bench_verify " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(), "model": args.model, "context": args.context, "roofline": roof,
              "step_roofline_ms": 1e3 * step_bound, "rows": rows}
    emit(result, args.out)
    return result


def loop_rows(args, cfg, params, prompt, lone_ms, timed) -> list[dict]:
    """Per-verification cost inside the speculative loop, for each tree size T > 1 (see the module doc)."""
    import jax
    import jax.numpy as jnp

    from jaxspec.drafters.ngram import NGram
    from jaxspec.generation import Sampling
    from jaxspec.speculative import speculative_generate_tokens

    rows = []
    lengths = jnp.asarray([args.context], jnp.int32)
    for T in (t for t in args.tokens if t > 1):
        drafter, dparams = NGram(k=T - 1).prepare(None)

        def run(n, drafter=drafter, dparams=dparams):
            return speculative_generate_tokens(
                params, dparams, prompt, lengths, jax.random.PRNGKey(0), jnp.int32(n), jnp.full((1,), -1, jnp.int32),
                Sampling.make(0.0, 0, 1.0), cfg=cfg, drafter=drafter, max_steps=args.loop,
                capacity=args.context + args.loop)

        steps = int(run(args.loop).target_forwards) - 1  # the loop's step counter starts at 1
        per_step = (timed(lambda: run(args.loop).tokens) - timed(lambda: run(1).tokens)) / steps
        rows.append({"variant": "kernel-loop", "tokens": T, "ms": 1e3 * per_step, "steps": steps,
                     "vs_lone_forward": 1e3 * per_step / lone_ms[T]})
        print(f"loop   T={T:3d}: {1e3 * per_step:8.1f} ms a verification ({steps} steps) = "
              f"{1e3 * per_step / lone_ms[T]:5.2f} x the lone forward", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
