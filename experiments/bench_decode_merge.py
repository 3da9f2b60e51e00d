"""Merged vs per-config decoding of an evaluation batch: what ``decode_sweeps`` saves the runner.

    python -m experiments.bench_decode_merge --config experiments/configs/paper-kv-1k-cpu.yaml \
        [--task vt] [--index 0] [--batch 1] [--repeats 1] [--out merge.json]

Builds the caches the runner builds for one batch of a config's grid (every method whose run is deferred:
kv methods, ``full``, prompt compressors that renumber positions, at every budget), then decodes them greedily
twice, compiled first: each config in its own decode loop (as a runner without merging would), and all of
them through ``decode_sweeps`` (one loop per ``merge_groups`` group). Reports both times, the decode steps,
whether every row's tokens agree, and the batch-1 decode step's roofline (bytes read a step over the mat-vec
bandwidth measured in this run). Writes one JSON object (stdout, and ``--out``).
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="an experiments/configs YAML (its target, draft, methods, budgets)")
    ap.add_argument("--task", help="default: the config's first task")
    ap.add_argument("--length", type=int, help="default: the config's first length")
    ap.add_argument("--index", type=int, default=0, help="first sample index")
    ap.add_argument("--batch", type=int, default=1, help="samples in the batch (indices index, index+1, ...)")
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats of each mode; the fastest is kept")
    ap.add_argument("--out", help="write the JSON here as well")
    args = ap.parse_args(argv)

    import jax.numpy as jnp

    import jaxspec
    from experiments import run
    from experiments.bench_generate import emit, machine_info, measure_roofline, rooflines
    from experiments.data import PromptFormat, dataset_module
    from jaxspec.api import default_stop_ids
    from jaxspec.kv.pipeline import SharedPrefills, decode_sweeps, merge_groups

    cfg = run.load_config(args.config)
    d = cfg["datasets"][0]
    task, length = args.task or d["tasks"][0], args.length or d["lengths"][0]
    target = jaxspec.load(run._resolve(cfg["target"]), dtype=cfg["dtype"], quiet=True)
    draft = jaxspec.load(run._resolve(cfg["draft"]), dtype=cfg["dtype"], quiet=True) if cfg["draft"] else None
    options = {k: run._resolve(v) for k, v in (d.get("options") or {}).items()}
    if d["name"] == "ruler":
        options.setdefault("seed", cfg["seed"])
    samples = list(dataset_module(d["name"]).samples(
        target.tokenizer, task, length=length, indices=range(args.index, args.index + args.batch),
        fmt=PromptFormat(chat=d.get("chat", cfg["chat"]), system=d.get("system", cfg["system"])), **options))
    n_new = min(min(x.max_new_tokens for x in samples), cfg["max_new_tokens"] or 1 << 30)  # as the runner caps it
    stops = default_stop_ids(target)
    specs = sorted((s for s in run.method_specs(cfg) if run.deferred(s)), key=lambda s: not run.prefills_alone(s))
    shared = SharedPrefills()
    sweeps, names = [], []
    for s in specs:
        sweeps.append(run.method_runner(s, target, draft)([x.ids for x in samples], n_new, s["budgets"], shared))
        names += [f"{s['name']}@{b}" if b is not None else s["name"] for b in s["budgets"]]
    configs = [c for cs in sweeps for c in cs]

    def alone():
        return [decode_sweeps(target, [[c]], max_new_tokens=n_new, stop_ids=stops)[0][0] for c in configs]

    def merged():
        return [r for g in decode_sweeps(target, sweeps, max_new_tokens=n_new, stop_ids=stops) for r in g]

    timed = {}
    for name, fn in (("alone", alone), ("merged", merged)):
        out = fn()  # compiles
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        timed[name] = (best, out)
    (t_alone, a), (t_merged, m) = timed["alone"], timed["merged"]
    steps = [max(len(r.token_ids) for r in rs) for rs in a]  # a config's loop runs to its longest row
    roof = measure_roofline(jnp.dtype(cfg["dtype"] or "float32"))
    step_bound = rooflines(target.config, target, roof, len(samples[0].ids), n_new, 1)["bytes_per_decode_step"] \
        / (roof["matvec_GBps"] * 1e9)
    groups = merge_groups(configs)
    result = {
        "benchmark": "decode_merge", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(),
        "settings": vars(args), "target": cfg["target"], "task": task, "length": length,
        "prompt_tokens": [len(x.ids) for x in samples], "max_new_tokens": n_new, "configs": names,
        "rows": len(configs) * len(samples), "groups": [[names[i] for i in g] for g in groups],
        "cache_capacity": [c.cache.capacity for c in configs],
        "alone_s": t_alone, "merged_s": t_merged, "speedup": t_alone / t_merged,
        "alone_steps": sum(steps), "alone_s_per_step": t_alone / sum(steps),
        "roofline": roof, "roofline_batch1_step_s": step_bound,
        "tokens_equal": [r.token_ids for rs in a for r in rs] == [r.token_ids for rs in m for r in rs],
        "rows_differing": sum(x.token_ids != y.token_ids for ra, rm in zip(a, m) for x, y in zip(ra, rm)),
    }
    print(f"{task}@{length}: {len(configs)} configs x {len(samples)} prompts, {len(groups)} merged loops: "
          f"alone {t_alone:.1f}s ({sum(steps)} steps, {t_alone / sum(steps) * 1e3:.0f} ms a step; roofline "
          f"{step_bound * 1e3:.0f}), merged {t_merged:.1f}s: {t_alone / t_merged:.2f}x; tokens equal: "
          f"{result['tokens_equal']}", flush=True)
    emit(result, args.out, stdout=False)
    return result


if __name__ == "__main__":
    main()
