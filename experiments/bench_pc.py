"""Prompt-compression benchmark: the draft pass each method costs vs the target prefill time it saves, on a
needle-in-a-haystack prompt, and whether the target still finds the needle.

    python -m experiments.bench_pc --target qwen2.5-coder-1.5b-instruct --draft qwen2.5-coder-0.5b-instruct \
        --lengths 1024 2048 4096 --capacity 256 [--methods specpc recency] [--out pc.json]

Per prompt length: the target's prefill of the full prompt, then per method the compression (draft pass +
selection) and the target's prefill of the compressed prompt; ``net_s = prefill saved - draft`` (> 0: the
method pays for itself before decoding starts). Every stage runs once to compile, then ``--repeats`` times;
the fastest run is kept. Prints one line per configuration and writes one JSON object (``--out``).
"""

from __future__ import annotations

import argparse
import time


def prefill_s(target, ids, repeats: int) -> float:
    import jaxspec

    jaxspec.generate(target, ids, max_new_tokens=1)
    return min(jaxspec.generate(target, ids, max_new_tokens=1).timings["prefill"] for _ in range(repeats))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--capacity", type=int, default=256)
    ap.add_argument("--kernel-size", type=int, default=32, help="SpecPC kernel and neighbourhood (paper: 32 or 64)")
    ap.add_argument("--methods", nargs="+", help="default: every registered method")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtype", help="e.g. bfloat16 on GPU (default float32)")
    ap.add_argument("--out", help="write the JSON here as well")
    args = ap.parse_args(argv)

    import jaxspec
    from experiments.bench_generate import emit, machine_info
    from experiments.bench_kv import ANSWER, needle_prompt
    from jaxspec.pc import METHODS, compress, make_method

    target = jaxspec.load(args.target, dtype=args.dtype, quiet=True)
    draft = jaxspec.load(args.draft, dtype=args.dtype, quiet=True)
    rows = []
    for n in args.lengths:
        prompt = needle_prompt(target.tokenizer, n)
        full = prefill_s(target, prompt, args.repeats)
        for name in args.methods or list(METHODS):
            pc = make_method(name, capacity=args.capacity,
                             **({"kernel_size": args.kernel_size} if name == "specpc" else {}))
            dm = draft if pc.needs_draft else None
            compress([prompt], pc, draft=dm)
            runs = [compress([prompt], pc, draft=dm) for _ in range(args.repeats)]
            c = min(runs, key=lambda r: r.timings["draft"])
            short = prefill_s(target, c.prompts[0], args.repeats)
            answer = jaxspec.generate(target, prompt, max_new_tokens=args.max_new_tokens, pc=pc, draft=dm).text or ""
            r = {"method": name, "params": pc.params(), "prompt_tokens": len(prompt), "tokens_out": len(c.prompts[0]),
                 "draft_s": c.timings["draft"], "prefill_full_s": full, "prefill_compressed_s": short,
                 "net_s": full - short - c.timings["draft"], "needle_found": ANSWER in answer, "text": answer}
            rows.append(r)
            print(f"n={len(prompt):5d} {name:<12} draft {r['draft_s']:7.3f}s prefill {full:7.3f}s -> {short:7.3f}s "
                  f"net {r['net_s']:+7.3f}s needle {'yes' if r['needle_found'] else 'no'}", flush=True)
    result = {"benchmark": "pc", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(),
              "settings": vars(args), "rows": rows}
    emit(result, args.out, stdout=False)
    return result


if __name__ == "__main__":
    main()
