"""Generation benchmark: prefill and decode throughput against this machine's measured roofline,
side by side with transformers (torch CPU) on the same prompts, in one run.

    python -m experiments.bench_generate --model qwen2.5-coder-0.5b-instruct --prompt-len 512 1024 \
        --new-tokens 64 --batch 1 8 [--reference] [--warm-load] [--out run.json] [--check baseline.json]

Writes one JSON object (stdout, and --out if given) with the machine, the roofline measured in this
run, jaxspec's figures, the reference's figures and their ratios, and a markdown table (stderr).
``--check`` compares the ratios with a saved run and exits 1 on a drop of more than 15 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
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
        repo = Path(__file__).parent
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=repo).stdout.strip()
        # uncommitted changes to tracked files: the figures are then of a tree that is not that commit
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=repo).stdout
        info["git_dirty"] = bool(changed.strip())
    except OSError:
        pass
    from jaxspec.models import cpu_kernels

    info["cpu_kernels"] = {kind: cpu_kernels.enabled(kind) for kind in ("matmul", "attention")}  # on by default?
    return info


def emit(result: dict, out: str | None, stdout: bool = True) -> None:
    """A benchmark's JSON: on stdout (for pipes and ``--json`` users) and, atomically, in ``out``."""
    text = json.dumps(result, indent=2)
    if stdout:
        print(text)
    if out:
        tmp = Path(out).with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_roofline(dtype=jnp.float32, repeats: int = 5) -> dict:
    """Mat-vec bandwidth (bytes of the matrix / time) and matmul FLOP/s in ``dtype`` with this JAX build.

    Sizes grow on accelerators so that the measurement is not dominated by launch latency: the mat-vec
    matrix is far larger than any cache (256 MiB fp32 on CPU, 1 GiB bf16 elsewhere)."""
    cpu = jax.default_backend() == "cpu"
    m = 8192 if cpu else 16384 * 2
    a = jnp.ones((m, 16384 if not cpu else m), dtype)
    x = jnp.ones((a.shape[1],), dtype)
    mv = jax.jit(lambda a, x: a @ x)
    t_mv = _best_time(lambda: mv(a, x).block_until_ready(), repeats)
    n = 2048 if cpu else 8192
    b = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda a, b: a @ b)
    t_mm = _best_time(lambda: mm(b, b).block_until_ready(), repeats)
    return {"dtype": jnp.dtype(dtype).name, "matvec_GBps": a.nbytes / t_mv / 1e9, "matmul_GFLOPs": 2 * n**3 / t_mm / 1e9}


def bench_jaxspec(model, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """Best-of-``repeats`` prefill and decode figures of one jitted generate call per repeat."""
    import jaxspec

    first = jaxspec.generate(model, prompts, max_new_tokens=new_tokens, stop_ids=[])
    runs = [jaxspec.generate(model, prompts, max_new_tokens=new_tokens, stop_ids=[]) for _ in range(repeats)]
    B, T = len(prompts), len(prompts[0])
    prefill = min(r[0].timings["prefill"] for r in runs)
    decode = min(r[0].timings["decode"] for r in runs)
    steps = len(runs[0][0].token_ids) - 1
    return {
        "batch": B,
        "prompt_len": T,
        "compile_s": first[0].timings["compile"],
        "recompiled_on_repeat": any(r[0].timings["compile"] > 0 for r in runs),
        "prefill_s": prefill,
        "prefill_tokens_per_s": B * T / prefill,
        "decode_s": decode,
        "decode_tokens_per_s": B * steps / decode,
        "tokens": runs[0][0].token_ids,
    }


def bench_transformers(ref, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    import torch

    ids = torch.tensor(prompts, device=ref.device)
    sync = torch.cuda.synchronize if ref.device.type == "cuda" else (lambda: None)

    def run(n):
        out = ref.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync()
        return out

    def prefill():
        ref(ids, logits_to_keep=1)
        sync()

    with torch.no_grad():
        t_prefill = _best_time(prefill, repeats)
        out = run(new_tokens)
        t_one = _best_time(lambda: run(1), repeats)  # generate's own overhead + prefill
        t_total = _best_time(lambda: run(new_tokens), max(1, repeats // 2))
    B, T = ids.shape
    decode_s = max(t_total - t_one, 1e-9)
    return {
        "batch": B,
        "prompt_len": T,
        "prefill_s": t_prefill,
        "prefill_tokens_per_s": B * T / t_prefill,
        "decode_s": decode_s,
        "decode_tokens_per_s": B * (new_tokens - 1) / decode_s,
        "tokens": out[0, T:].tolist(),
    }


def load_reference(model_path: str, dtype: str = "float32"):
    """transformers on the same weights: torch CPU, or CUDA when this JAX run is on a GPU."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    p = Path(model_path)
    kw = {"dtype": getattr(torch, dtype)}
    if p.is_file():
        ref = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, **kw)
    else:
        ref = transformers.AutoModelForCausalLM.from_pretrained(p, **kw)
    return ref.to("cuda" if jax.default_backend() == "gpu" else "cpu").eval()


def rooflines(cfg, model, roof: dict, prompt_len: int, new_tokens: int, batch: int) -> dict:
    """Tokens/s bounds: decode by bytes read per step over measured bandwidth, prefill by FLOPs over
    measured matmul throughput."""
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
    embed_bytes = cfg.vocab_size * cfg.hidden_size * jnp.dtype(cfg.param_dtype).itemsize
    read_bytes = param_bytes - (0 if cfg.tie_word_embeddings else embed_bytes)  # embedding: one row per token
    kv_bytes = cfg.kv_bytes_per_token() * (prompt_len + new_tokens // 2) * batch
    # prefill computes no LM head (last position only) and gathers embeddings: matmul FLOPs are the layers'
    # weights plus causal attention (QK and PV over prompt_len / 2 keys on average)
    head_and_embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    attention = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * prompt_len / 2
    flops_per_token = 2 * (cfg.num_params() - head_and_embed) + attention
    return {
        "decode_tokens_per_s": roof["matvec_GBps"] * 1e9 / (read_bytes + kv_bytes) * batch,
        "prefill_tokens_per_s": roof["matmul_GFLOPs"] * 1e9 / flops_per_token,
        "bytes_per_decode_step": read_bytes + kv_bytes,
    }


def check_against(baseline_path: str, result: dict, tolerance: float = 0.15) -> list[str]:
    """Ratios that dropped by more than ``tolerance`` relative to a saved baseline JSON."""
    base = json.loads(Path(baseline_path).read_text())
    drops = []
    for key, old in base.get("ratios", {}).items():
        new = result["ratios"].get(key)
        if isinstance(old, (int, float)) and not isinstance(old, bool) and isinstance(new, (int, float)):
            if new < old * (1 - tolerance):
                drops.append(f"{key}: {new:.3f} < {old:.3f} - {tolerance:.0%}")
    return drops


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model path or registry name")
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[512], help="one or more prompt lengths")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="one or more batch sizes (decode)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="param/compute dtype (fp32 on CPU; bf16 is for GPU/TPU), also the reference's")
    ap.add_argument("--layout", choices=["stacked", "unstacked"],
                    help="per-layer weight layout (default: jaxspec.load's choice for this backend)")
    ap.add_argument("--reference", action="store_true",
                    help="also run transformers on the same prompts (torch CPU, or CUDA on a GPU run)")
    ap.add_argument("--warm-load", action="store_true", help="also convert to orbax and time the reload")
    ap.add_argument("--out", help="write the JSON here as well")
    ap.add_argument("--check", metavar="BASELINE_JSON",
                    help="compare ratios with a saved run; exit 1 on a drop of more than 15%%")
    args = ap.parse_args(argv)

    import jaxspec
    from jaxspec.fetch import resolve_model

    path = resolve_model(args.model)
    model = jaxspec.load(path, dtype=args.dtype, layout=args.layout)
    cfg = model.config
    load = {"cold_s": model.load_seconds}
    if args.warm_load:
        import shutil
        import tempfile

        from jaxspec.conversion.checkpoint import save_checkpoint

        tmp = Path(tempfile.mkdtemp()) / "ckpt"
        save_checkpoint(tmp, cfg, model.params, tokenizer=model.tokenizer)
        load["warm_orbax_s"] = jaxspec.load(tmp).load_seconds
        shutil.rmtree(tmp.parent)
    rng = np.random.default_rng(0)

    def prompts(batch, length):
        return rng.integers(100, min(cfg.vocab_size, 30000), (batch, length)).tolist()

    roof = measure_roofline(jnp.dtype(args.dtype))
    runs = []
    cases = [(1, n) for n in args.prompt_len] + [(b, args.prompt_len[0]) for b in args.batch if b != 1]
    for b, n in cases:
        p = prompts(b, n)
        runs.append({"prompts": p, "jaxspec": bench_jaxspec(model, p, args.new_tokens, args.repeats),
                     "roofline": rooflines(cfg, model, roof, n, args.new_tokens, b)})
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
    del model
    if args.reference:
        ref = load_reference(path, args.dtype)
        for r in runs:
            r["transformers"] = bench_transformers(ref, r["prompts"], args.new_tokens, args.repeats)
    table = []
    for r in runs:
        ours, bound = r.pop("jaxspec"), r.pop("roofline")
        r.pop("prompts")
        row = {"batch": ours["batch"], "prompt_len": ours["prompt_len"], "jaxspec": ours, "roofline": bound,
               "decode_vs_roofline": ours["decode_tokens_per_s"] / bound["decode_tokens_per_s"],
               "prefill_vs_roofline": ours["prefill_tokens_per_s"] / bound["prefill_tokens_per_s"]}
        if "transformers" in r:
            ref_r = r["transformers"]
            row |= {"transformers": ref_r,
                    "decode_vs_transformers": ours["decode_tokens_per_s"] / ref_r["decode_tokens_per_s"],
                    "prefill_vs_transformers": ours["prefill_tokens_per_s"] / ref_r["prefill_tokens_per_s"],
                    "transformers_decode_vs_roofline": ref_r["decode_tokens_per_s"] / bound["decode_tokens_per_s"],
                    "greedy_tokens_equal": ours["tokens"] == ref_r["tokens"]}
        table.append(row)
    first = table[0]
    result = {
        "benchmark": "generate",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python -m experiments.bench_generate " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "model": {"source": args.model if not Path(args.model).exists() else Path(args.model).name,
                  "file": Path(path).name, "model_type": cfg.model_type, "params": cfg.num_params(),
                  "param_bytes": param_bytes, "dtype": cfg.dtype, "load": load,
                  "layout": args.layout or "unstacked"},
        "roofline": roof,
        "runs": table,
        "ratios": {k: v for k, v in first.items() if k.endswith(("_vs_roofline", "_vs_transformers"))},
    }
    emit(result, args.out)
    print(markdown_table(result), file=sys.stderr)
    if args.check:
        drops = check_against(args.check, result)
        for d in drops:
            print(f"REGRESSION {d}", file=sys.stderr)
        if drops:
            sys.exit(1)
    return result


def markdown_table(result: dict) -> str:
    rows = ["| batch | prompt | prefill tok/s | vs roofline | decode tok/s | vs roofline | vs transformers (prefill / decode) | compile s |",
            "|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in result["runs"]:
        o = r["jaxspec"]
        vs = (f"{r['prefill_vs_transformers']:.2f}x / {r['decode_vs_transformers']:.2f}x"
              if "transformers" in r else "-")
        rows.append(f"| {r['batch']} | {r['prompt_len']} | {o['prefill_tokens_per_s']:.1f} | "
                    f"{r['prefill_vs_roofline']:.0%} | {o['decode_tokens_per_s']:.2f} | {r['decode_vs_roofline']:.0%} | "
                    f"{vs} | {o['compile_s']:.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
