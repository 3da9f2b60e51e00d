"""Generation benchmark: prefill and decode throughput against this machine's measured roofline,
side by side with transformers (torch CPU) on the same prompts, in one run.

    python -m experiments.bench_generate --model qwen2.5-coder-0.5b-instruct --prompt-len 512 \
        --new-tokens 64 --batch 1 [--reference] [--out results.json]

Writes one JSON object (stdout, and --out if given) with the machine, the roofline measured in this
run, jaxspec's figures, the reference's figures, and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    return info


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_roofline(dtype=jnp.float32, repeats: int = 5) -> dict:
    """fp32 mat-vec bandwidth (bytes of the matrix / time) and matmul FLOP/s with this JAX build."""
    a = jnp.ones((8192, 8192), dtype)  # 256 MiB in fp32: far larger than any cache
    x = jnp.ones((8192,), dtype)
    mv = jax.jit(lambda a, x: a @ x)
    t_mv = _best_time(lambda: mv(a, x).block_until_ready(), repeats)
    n = 2048
    b = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda a, b: a @ b)
    t_mm = _best_time(lambda: mm(b, b).block_until_ready(), repeats)
    return {"dtype": jnp.dtype(dtype).name, "matvec_GBps": a.nbytes / t_mv / 1e9, "matmul_GFLOPs": 2 * n**3 / t_mm / 1e9}


def bench_jaxspec(model, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    import jaxspec

    first = jaxspec.generate(model, prompts, max_new_tokens=new_tokens, stop_ids=[])
    runs = [jaxspec.generate(model, prompts, max_new_tokens=new_tokens, stop_ids=[]) for _ in range(repeats)]
    best = min(runs, key=lambda r: r[0].timings["prefill"] + r[0].timings["decode"])[0]
    B, T = len(prompts), len(prompts[0])
    return {
        "compile_s": first[0].timings["compile"],
        "recompiled_on_repeat": any(r[0].timings["compile"] > 0 for r in runs),
        "prefill_s": best.timings["prefill"],
        "prefill_tokens_per_s": B * T / best.timings["prefill"],
        "decode_s": best.timings["decode"],
        "decode_tokens_per_s": best.tokens_per_second,
        "tokens": best.token_ids,
    }


def bench_transformers(model_path: str, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    p = Path(model_path)
    kw = {"dtype": torch.float32}
    if p.is_file():
        ref = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, **kw).eval()
    else:
        ref = transformers.AutoModelForCausalLM.from_pretrained(p, **kw).eval()
    ids = torch.tensor(prompts)
    with torch.no_grad():
        t_prefill = _best_time(lambda: ref(ids, logits_to_keep=1), repeats)

        def run():
            return ref.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=0)

        out = run()
        t_total = _best_time(run, max(1, repeats // 2))
    B, T = ids.shape
    decode_s = max(t_total - t_prefill, 1e-9)
    return {
        "prefill_s": t_prefill,
        "prefill_tokens_per_s": B * T / t_prefill,
        "decode_s": decode_s,
        "decode_tokens_per_s": B * (new_tokens - 1) / decode_s,
        "tokens": out[0, T:].tolist(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model path or registry name")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference", action="store_true", help="also run transformers (torch CPU) on the same prompts")
    ap.add_argument("--out", help="write the JSON here as well")
    args = ap.parse_args(argv)

    import jaxspec
    from jaxspec.fetch import resolve_model

    path = resolve_model(args.model)
    model = jaxspec.load(path)
    cfg = model.config
    rng = np.random.default_rng(0)
    prompts = rng.integers(100, min(cfg.vocab_size, 30000), (args.batch, args.prompt_len)).tolist()

    roof = measure_roofline()
    ours = bench_jaxspec(model, prompts, args.new_tokens, args.repeats)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
    embed_bytes = cfg.vocab_size * cfg.hidden_size * np.dtype(cfg.param_dtype).itemsize
    # decode reads every weight once per step (the embedding table only for one row, unless tied to the head)
    read_bytes = param_bytes - (0 if cfg.tie_word_embeddings else embed_bytes)
    kv_bytes = cfg.kv_bytes_per_token() * (args.prompt_len + args.new_tokens // 2)
    roof_decode = roof["matvec_GBps"] * 1e9 / (read_bytes + kv_bytes * args.batch) * args.batch
    matmul_flops_per_token = 2 * (cfg.num_params() - cfg.vocab_size * cfg.hidden_size)
    roof_prefill = roof["matmul_GFLOPs"] * 1e9 / matmul_flops_per_token
    result = {
        "benchmark": "generate",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(),
        "model": {"source": model.source, "model_type": cfg.model_type, "params": cfg.num_params(),
                  "param_bytes": param_bytes, "dtype": cfg.dtype, "load_s": model.load_seconds},
        "settings": vars(args),
        "roofline": roof | {"decode_tokens_per_s": roof_decode, "prefill_tokens_per_s": roof_prefill},
        "jaxspec": ours,
        "ratios": {
            "decode_vs_roofline": ours["decode_tokens_per_s"] / roof_decode,
            "prefill_vs_roofline": ours["prefill_tokens_per_s"] / roof_prefill,
        },
    }
    if args.reference:
        ref = bench_transformers(path, prompts, args.new_tokens, args.repeats)
        result["transformers"] = ref
        result["ratios"] |= {
            "decode_vs_transformers": ours["decode_tokens_per_s"] / ref["decode_tokens_per_s"],
            "prefill_vs_transformers": ours["prefill_tokens_per_s"] / ref["prefill_tokens_per_s"],
            "reference_decode_vs_roofline": ref["decode_tokens_per_s"] / roof_decode,
            "greedy_tokens_equal": ours["tokens"] == ref["tokens"],
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out)
    return result


if __name__ == "__main__":
    main()
