"""Tables and plots of evaluation runs: ``python -m experiments.summarize RUN_DIR... [--out DIR]``.

Reads each run's ``predictions.jsonl`` (so a run still in progress can be summarised), aggregates it with
``experiments.metrics.aggregate`` and writes to ``--out`` (default: the first run directory):

* ``summary.md``: per dataset and length, a markdown table task x (method, budget) of scores, then the
  category averages and ``All``; for unscored datasets (HumanEval) tokens/s and tokens per target forward;
  for methods whose records keep a lookahead (SpecKV, SpecPC), how often the lookahead itself answers and
  the method's score when it does and when it does not; then the cost table: per (method, budget) the median
  seconds a record spent in each timed stage (draft passes, prefill, scoring, decode; model loading and XLA
  compiles are one-off and left out) and their sum;
* ``score_vs_budget_{dataset}_{length}.png``: the ``All`` score against the budget, one line per method
  (methods without a budget as dashed horizontal lines); the axis says whether the budgets are KV capacities,
  kept prompt tokens (prompt compression) or both;
* ``accepted_{dataset}.png``: for speculative runs, the histogram of accepted drafts per verification step.

With several run directories, methods are labelled ``RUN/method``.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from experiments.metrics import aggregate
from experiments.run import read_records, save_figure, write_text


def load_runs(run_dirs: list[str]) -> list[dict]:
    """Records of every run, methods prefixed with the run's folder name when there are several runs."""
    records = []
    for d in run_dirs:
        for r in read_records(Path(d) / "predictions.jsonl"):
            if len(run_dirs) > 1:
                r["method"] = f"{Path(d).name}/{r['method']}"
            records.append(r)
    return records


def _fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def _budget_key(b):
    return (b is not None, b if b is not None else 0)


def tables(rows: list[dict], order: dict[str, int]) -> str:
    """Markdown: one table per (dataset, length)."""
    from experiments.data import dataset_module

    out = []
    for (ds, length), group in _by(rows, ("dataset", "length")).items():
        cols = sorted({(r["method"], r["budget"]) for r in group},
                      key=lambda c: (order.get(c[0], len(order)), _budget_key(c[1])))
        cell = {(r["task"], r["method"], r["budget"]): r for r in group}
        head = [f"{m}" if b is None else f"{m} @{b}" for m, b in cols]
        out.append(f"### {ds}" + ("" if length is None else f", length {length}") + "\n")
        task_names = [t for t in dataset_module(ds).TASKS if any(r["task"] == t for r in group)]
        scored = any(r["score"] is not None for r in group)
        if scored:
            out.append("| task | " + " | ".join(head) + " |")
            out.append("|---|" + "---:|" * len(cols))
            summary = list(dataset_module(ds).CATEGORIES) + ["All"]
            for t in task_names + [s for s in summary if any(r["task"] == s for r in group)]:
                label = t if t in task_names else f"**{t}**"
                out.append(f"| {label} | " + " | ".join(_fmt((cell.get((t, m, b)) or {}).get("score"))
                                                        for m, b in cols) + " |")
        else:
            out.append("| task | method | n | tokens/s | tokens per target forward |")
            out.append("|---|---|---:|---:|---:|")
            for t in task_names:
                for m, b in cols:
                    r = cell.get((t, m, b))
                    if r:
                        name = m if b is None else f"{m} @{b}"
                        out.append(f"| {t} | {name} | {r['n']} | {_fmt(r['tokens_per_second'])} | "
                                   f"{_fmt(r['tokens_per_forward'], 2)} |")
        out.append("")
    return "\n".join(out)


ONE_OFF_TIMINGS = ("load", "compile")


def costs(records: list[dict]) -> str:
    """Markdown: per (dataset, length), the median seconds per record of every timed stage and of their sum,
    per (method, budget) and, for methods with several budgets, over all of them ("all"). A record made in a
    batch of ``batch`` prompts is charged ``1/batch`` of its batch's seconds."""
    import numpy as np

    out = []
    timed = [r for r in records if r.get("timings")]
    for (ds, length), group in _by(timed, ("dataset", "length")).items():
        stages = list(dict.fromkeys(k for r in group for k in r["timings"] if k not in ONE_OFF_TIMINGS))
        out.append(f"### cost per record, {ds}" + ("" if length is None else f", length {length}") + "\n")
        out.append("median seconds per record (compile and load excluded; a prefill shared by several budgets "
                   "counts in full in each; a batch's seconds are split evenly among its prompts)\n")
        out.append("| method | budget | records | " + " | ".join(stages) + " | total |")
        out.append("|---|---:|---:|" + "---:|" * (len(stages) + 1))
        by_method = _by(group, ("method",))
        for method in dict.fromkeys(r["method"] for r in group):
            rs = by_method[(method,)]
            cells = [(b, [r for r in rs if r["budget"] == b]) for b in sorted({r["budget"] for r in rs},
                                                                             key=_budget_key)]
            if len(cells) > 1:
                cells.append(("all", rs))
            for b, sel in cells:
                med = [np.median([r["timings"].get(k, 0.0) / r.get("batch", 1) for r in sel]) for k in stages]
                total = np.median([sum(v for k, v in r["timings"].items() if k not in ONE_OFF_TIMINGS)
                                   / r.get("batch", 1) for r in sel])
                out.append(f"| {method} | {'-' if b is None else b} | {len(sel)} | "
                           + " | ".join(_fmt(m) for m in med) + f" | {_fmt(total)} |")
        out.append("")
    return "\n".join(out)


def lookaheads(records: list[dict]) -> str:
    """Markdown: per (dataset, length), for each (method, budget) whose records keep a lookahead (SpecKV's
    draft answer, the oracle's target answer, SpecPC's), the lookahead scored as if it were the prediction,
    and the records' mean score where the lookahead scored 100 and where it did not: whether the selection
    needs the draft to be right. Empty when no record keeps one."""
    from experiments.metrics import score

    def mean(xs):
        return None if not xs else 100 * sum(xs) / len(xs)

    looked = []
    for r in records:
        text = (r.get("kv") or {}).get("lookahead", (r.get("pc") or {}).get("lookahead"))
        s = None if text is None else score(r["dataset"], r["task"], text, r["answers"], r.get("meta"))
        if s is not None and r.get("score") is not None:
            looked.append({**r, "look_score": s})
    out = []
    for (ds, length), group in _by(looked, ("dataset", "length")).items():
        out.append(f"### lookahead, {ds}" + ("" if length is None else f", length {length}") + "\n")
        out.append("the lookahead scored as the answer, and the method's score where the lookahead was right "
                   "(scored 100) and where it was not; records in parentheses\n")
        out.append("| method | budget | records | lookahead score | score, lookahead right | "
                   "score, lookahead not right |")
        out.append("|---|---:|---:|---:|---:|---:|")
        for (method, budget), sel in sorted(_by(group, ("method", "budget")).items(),
                                            key=lambda kv: (kv[0][0], _budget_key(kv[0][1]))):
            right = [r["score"] for r in sel if r["look_score"] == 1.0]
            wrong = [r["score"] for r in sel if r["look_score"] != 1.0]
            out.append(f"| {method} | {'-' if budget is None else budget} | {len(sel)} | "
                       f"{_fmt(mean([r['look_score'] for r in sel]))} | {_fmt(mean(right))} ({len(right)}) | "
                       f"{_fmt(mean(wrong))} ({len(wrong)}) |")
        out.append("")
    return "\n".join(out)


def _by(rows, keys):
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r)
    return dict(sorted(groups.items(), key=lambda kv: str(kv[0])))


BUDGET_LABELS = {"kv": "KV capacity per layer and head", "pc": "prompt tokens kept"}


def plot_scores(rows: list[dict], out: Path, budget_of: dict[str, str | None] | None = None) -> list[Path]:
    """``All`` score vs budget per method, one PNG per (dataset, length); ``budget_of``: method -> what its
    budgets are ("kv" or "pc", the records' ``budget_of``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for (ds, length), group in _by([r for r in rows if r["kind"] == "all"], ("dataset", "length")).items():
        fig, ax = plt.subplots(figsize=(7.5, 4))
        budgets = sorted({r["budget"] for r in group if r["budget"] is not None})
        for method, rs in _by(group, ("method",)).items():
            pts = sorted((r["budget"], r["score"]) for r in rs if r["budget"] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method[0])
            for r in rs:
                if r["budget"] is None:
                    ax.axhline(r["score"], linestyle="--", color="gray" if method[0] == "full" else None,
                               label=method[0])
        if budgets:
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(b) for b in budgets])
        kinds = sorted({(budget_of or {}).get(r["method"]) or "kv" for r in group if r["budget"] is not None})
        ax.set_xlabel("budget (" + " / ".join(BUDGET_LABELS[k] for k in kinds or ["kv"]) + ", tokens)")
        ax.set_ylabel("score (All)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"{ds}" + ("" if length is None else f", length {length}"))
        # beside the axes, not on them: with eight methods a legend inside covers the lines
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        fig.tight_layout()
        path = out / f"score_vs_budget_{ds}_{length}.png"
        save_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_accepted(records: list[dict], out: Path) -> list[Path]:
    """Histogram of accepted drafts per verification step for records that carry one, per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    spec = [r for r in records if r.get("accepted_hist")]
    for (ds,), rs in _by(spec, ("dataset",)).items():
        hists: dict[str, np.ndarray] = {}
        for r in rs:
            name = r["method"] if r["budget"] is None else f"{r['method']} @{r['budget']}"
            h = np.asarray(r["accepted_hist"], float)
            prev = hists.get(name, np.zeros(0))
            size = max(len(prev), len(h))
            hists[name] = np.pad(prev, (0, size - len(prev))) + np.pad(h, (0, size - len(h)))
        fig, ax = plt.subplots(figsize=(6, 4))
        width = 0.8 / len(hists)
        for j, (name, h) in enumerate(hists.items()):
            ax.bar(np.arange(len(h)) + j * width, h / max(h.sum(), 1), width, label=name)
        ax.set_xlabel("accepted draft tokens per step")
        ax.set_ylabel("fraction of steps")
        ax.set_title(ds)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / f"accepted_{ds}.png"
        save_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def summarize(run_dirs: list[str], out: str | Path | None = None) -> tuple[str, list[Path]]:
    """Write ``summary.md`` and the plots; returns (markdown, plot paths)."""
    out = Path(out or run_dirs[0])
    out.mkdir(parents=True, exist_ok=True)
    records = load_runs(run_dirs)
    rows = aggregate(records)
    order = {}
    for r in records:
        order.setdefault(r["method"], len(order))
    look = lookaheads(records)
    md = tables(rows, order) + "\n" + (look + "\n" if look else "") + costs(records)
    write_text(out / "summary.md", md)
    budget_of = {r["method"]: r.get("budget_of") for r in records}
    return md, plot_scores(rows, out, budget_of) + plot_accepted(records, out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run directories")
    ap.add_argument("--out", help="where summary.md and the plots go (default: the first run directory)")
    args = ap.parse_args(argv)
    md, paths = summarize(args.runs, args.out)
    print(md)
    for p in paths:
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
