"""KV-compression benchmark: end-to-end latency split (draft, target prefill, scoring + gather, decode) and
KV bytes kept, for every method relative to ``full``, on a needle-in-a-haystack prompt.

    python -m experiments.bench_kv --target qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct \
        --lengths 1024 2048 4096 --capacities 128 256 [--methods full snapkv speckv] [--out kv.json]

Every configuration runs once to compile and warm up, then ``--repeats`` times; the fastest end-to-end run
is kept (``--repeats 0``: the first run's stage timings, which never include compilation, are the result). Timings exclude compilation (the stages are compiled ahead of time). Prints a table and writes one
JSON object (``--out``). Targets (issue 4): SpecKV end-to-end <= 1.25x SnapKV; score <= 10 % of prefill.
"""

from __future__ import annotations

import argparse
import time

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
          "A river runs past the old mill, and the wheel turns slowly in the afternoon light. ")
NEEDLE = "The secret passcode for the vault is 7342."
QUESTION = "What is the secret passcode for the vault? Answer with the number only."
ANSWER = "7342"


def needle_prompt(tokenizer, n_tokens: int, depth: float = 0.4) -> list[int]:
    """Chat-formatted token ids, about ``n_tokens`` long: filler text with ``NEEDLE`` at ``depth``, then
    ``QUESTION``."""
    per = len(tokenizer.encode(FILLER))
    reps = max(1, (n_tokens - 80) // per)
    parts = [FILLER] * reps
    parts.insert(int(reps * depth), NEEDLE + " ")
    msgs = [{"role": "user", "content": "".join(parts) + "\n\n" + QUESTION}]
    return tokenizer.encode(tokenizer.apply_chat_template(msgs), add_special_tokens=False)


def run_one(target, draft, prompt, kv, max_new_tokens: int, repeats: int) -> dict:
    import jaxspec

    def once():
        return jaxspec.generate(target, prompt, max_new_tokens=max_new_tokens, kv=kv,
                                draft=draft if kv.needs_draft else None)

    first = once()
    best = min([first] + [once() for _ in range(repeats)], key=lambda r: _total(r.timings))
    t = best.timings
    return {"method": kv.name, "params": kv.params(), "compile_s": first.timings["compile"],
            "draft_s": t["draft"], "prefill_s": t["prefill"], "score_s": t["score"], "decode_s": t["decode"],
            "total_s": _total(t), "kv": {k: v for k, v in best.kv.items() if k != "params"},
            "text": best.text, "needle_found": ANSWER in (best.text or "")}


def _total(t: dict) -> float:
    return t["draft"] + t["prefill"] + t["score"] + t["decode"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--capacities", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--methods", nargs="+", help="default: every registered method")
    ap.add_argument("--window-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after the first (0: time the first)")
    ap.add_argument("--dtype", help="e.g. bfloat16 on GPU (default float32)")
    ap.add_argument("--out", help="write the JSON here as well")
    args = ap.parse_args(argv)

    import jaxspec
    from experiments.bench_generate import emit, machine_info
    from jaxspec.kv import METHODS, make_method

    target = jaxspec.load(args.target, dtype=args.dtype, quiet=True)
    draft = jaxspec.load(args.draft, dtype=args.dtype, quiet=True)
    names = args.methods or list(METHODS)
    rows = []
    for n in args.lengths:
        prompt = needle_prompt(target.tokenizer, n)
        base = run_one(target, draft, prompt, make_method("full"), args.max_new_tokens, args.repeats)
        for C in args.capacities:
            for name in names:
                if name == "full":
                    r = dict(base)
                else:
                    params = {"capacity": C} | ({} if name == "streamingllm" else {"window_size": args.window_size})
                    r = run_one(target, draft, prompt, make_method(name, **params), args.max_new_tokens, args.repeats)
                r |= {"prompt_tokens": len(prompt), "capacity": C, "total_vs_full": r["total_s"] / base["total_s"],
                      "kv_bytes_vs_full": r["kv"]["kv_bytes_kept"] / r["kv"]["kv_bytes_full"],
                      "score_vs_prefill": r["score_s"] / r["prefill_s"]}
                rows.append(r)
                print(f"n={len(prompt):5d} C={C:4d} {name:<14} draft {r['draft_s']:7.3f}s prefill {r['prefill_s']:7.3f}s "
                      f"score {r['score_s']:6.3f}s decode {r['decode_s']:7.3f}s total {r['total_vs_full']:5.2f}x full "
                      f"KV {r['kv_bytes_vs_full']:6.1%} needle {'yes' if r['needle_found'] else 'no'}", flush=True)
    checks = []
    for n in {r["prompt_tokens"] for r in rows}:
        for C in args.capacities:
            by = {r["method"]: r for r in rows if r["prompt_tokens"] == n and r["capacity"] == C}
            if "speckv" in by and "snapkv" in by:
                checks.append({"prompt_tokens": n, "capacity": C,
                               "speckv_vs_snapkv_total": by["speckv"]["total_s"] / by["snapkv"]["total_s"],
                               "speckv_score_vs_prefill": by["speckv"]["score_vs_prefill"]})
    result = {"benchmark": "kv", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(),
              "settings": vars(args), "rows": rows, "targets": checks}
    emit(result, args.out, stdout=False)
    return result


if __name__ == "__main__":
    main()
