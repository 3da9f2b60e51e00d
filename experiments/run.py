"""Evaluation runner: ``python -m experiments.run CONFIG.yaml [key=value ...]``.

A config (see ``experiments/configs/``) names the target (and draft) model, the prompt format, the datasets
with their tasks, lengths and sample counts, and the methods and budgets: the grid is every
(task, length, sample) x (method, budget). ``key=value`` overrides set config entries by dotted path
(``budgets=[128,256]``, ``datasets.0.samples=5``; values are parsed as YAML).

The run directory (``out``) gets ``config.yaml`` (the resolved config), ``env.json`` (jax version, devices, git
commit, machine), ``predictions.jsonl`` (one record per generated sample, appended and fsynced, keyed by
(task, length, method, budget, index)) and ``metrics.json`` (``experiments.metrics.aggregate`` of every record).
Killed and restarted with the same directory, a run skips the records already written (a half-written last
line is dropped) and ends with every record exactly once. A restart may grow the grid (more samples, methods,
budgets, lengths); it refuses a change of model, prompt format, seed or dataset options.

Methods: an entry of ``methods`` is a name or ``{name, kind?, method?, params?, budgets?, kv?, kv_params?,
budget?}``, turned into ``jaxspec`` calls by ``method_runner``:

* ``full``: the whole prompt's cache (``jaxspec.kv``'s ``full`` through ``jaxspec.kv.pipeline``: the greedy decode
  of ``jaxspec.generate``, whose plain target prefill StreamingLLM reuses; no budget);
* ``kv``: a ``jaxspec.kv`` method (``method``, default ``name``; ``streamingllm``, ``snapkv``, ``speckv`` ...) with
  ``capacity`` = the budget (``jaxspec.kv.pipeline.generate_budgets``, which is ``jaxspec.generate(kv=...,
  draft=...)`` per budget with the draft lookahead and the target prefill shared by the budgets);
* ``pc``: a ``jaxspec.pc`` prompt-compression method (``specpc``, ``specprefill``, ``draft-ppl``, ``recency``,
  ``random``) through ``jaxspec.pc.pipeline.prefill_budgets`` (``jaxspec.generate(pc=..., draft=...)`` per
  budget up to its decode, one draft scoring pass for all budgets; SpecPrefill, which prefills at the
  original positions, through ``generate_budgets``). ``kv`` / ``kv_params`` add a KV method after it (``kv:
  speckv`` is SpecKV-PC, reusing the draft's lookahead); ``budget`` says which capacity the budgets set:
  ``pc`` (default) or ``kv`` (the pc capacity then comes from ``params``, e.g. SpecKV-PC's 2048, and one
  compression and one target prefill serve every kv budget);
* ``drafter``: speculative decoding (``jaxspec.speculative.generate_speculative``) with a registered drafter
  (``ngram``, ``draft-model``; no budget); records carry accepted-length statistics.

Without ``kind``: ``full`` for ``full``, ``kv`` for a ``jaxspec.kv`` method name, ``pc`` for a ``jaxspec.pc`` one, else
``drafter``. Budgets come from the method's own ``budgets`` or the config's; methods without a budget run once
(budget null).

Batches: ``batch_size`` (default 1) samples of one (task, length) with equal ``max_new_tokens`` go through each
method together (every ``jaxspec`` path takes a batch of prompts; results do not depend on the batch beyond
float rounding). Per batch, a method's missing budgets run as one sweep (one shared prefill or scoring pass),
and the kv methods (``full`` included) and the prompt compressors (but SpecPrefill) first compress and
prefill, then decode every config's rows as one greedy batch (``jaxspec.kv.pipeline.decode_sweeps``: one
decode loop for the caches within ``MERGE_SPREAD`` times each other's capacity, e.g. one for the batch's
compressed configs and one for its uncompressed ones, where decode at batch 1 would read the weights once per
config and step). Records are still written one per (sample, budget), so a
run killed inside a sweep resumes with the budgets left (a restart recomputes, for a batch, the union of its
samples' missing budgets and writes only what is missing). A record's ``timings`` are its batch's (a merged
decode's seconds split among its configs by rows) and ``batch`` says how many prompts shared them. On a 2-core
CPU a batch of 2 made the prefill ~1.3x cheaper a record; decode gains where small-row matmuls are cheap
(the CPU kernel with AVX2 or AVX-512: 1.65x at batch 2 on an AVX2 EPYC; a GPU, where the grid runs up to
``batch_size`` times faster).
KV methods of one batch also share target prefills (``jaxspec.kv.pipeline.SharedPrefills``): one plain
prefill serves ``full``, StreamingLLM, SnapKV/PyramidKV/AdaKV and SpecKV (scored by ``score_suffix``) and
SpecKV-oracle's lookahead. H2O, whose scores need every prompt row captured, prefills on its own; it runs
first in a batch (as every ``prefills_alone`` method does), so that its prefill is the plain one too: one
target prefill of the prompt a batch for the whole KV grid.

Not shared: the draft passes of different methods of one batch (SpecKV's lookahead of ``max_new_tokens``
tokens and SpecPC's attention pass over the prompt with its 1 or 20 tokens are different programs; only
their draft prefill of the prompt is common, which a fused stage would be needed to reuse).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parents[1]
IDENTITY = ("target", "draft", "dtype", "chat", "system", "seed", "max_new_tokens")  # fixed for a run directory


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w"):
    """A file that replaces ``path`` only once it is completely written (temp file in the same folder,
    fsync, rename); on an error the temp file is removed and ``path`` is left as it was."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, default=str)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_open(path) as f:
        f.write(text)


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Save a matplotlib figure atomically, in the format of ``path``'s suffix."""
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=dpi, format=path.suffix.lstrip("."))


def set_path(cfg: dict, dotted: str, value: Any) -> None:
    """Set ``cfg[a][b]...`` for ``dotted = "a.b..."`` (numeric parts index lists)."""
    *head, last = dotted.split(".")
    node = cfg
    for part in head:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """The YAML config at ``path`` with ``key=value`` overrides applied, defaults filled in."""
    cfg = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        set_path(cfg, key, yaml.safe_load(value))
    for key in ("target", "datasets", "methods"):
        if not cfg.get(key):
            raise ValueError(f"config needs {key!r}")
    cfg.setdefault("out", str(Path("runs") / Path(path).stem))
    for key, default in (("draft", None), ("dtype", None), ("chat", True), ("system", None), ("seed", 42),
                         ("max_new_tokens", None), ("samples", 10), ("budgets", []), ("batch_size", 1)):
        cfg.setdefault(key, default)
    return cfg


def identity(cfg: dict) -> dict:
    """What a run directory's records depend on besides the grid."""
    return {**{k: cfg.get(k) for k in IDENTITY},
            "datasets": [(d["name"], d.get("options") or {}, d.get("chat"), d.get("system")) for d in cfg["datasets"]]}


def method_specs(cfg: dict) -> list[dict]:
    """Normalised method entries: ``{name, kind, method, params, budgets, kv, kv_params, budget_of}``
    (``budget_of``: which capacity a budget sets, "kv" or "pc"; None for methods without budgets)."""
    from jaxspec.kv import METHODS as KV_METHODS
    from jaxspec.pc import METHODS as PC_METHODS

    out = []
    for m in cfg["methods"]:
        m = {"name": m} if isinstance(m, str) else dict(m)
        method = m.get("method", m["name"])
        kind = m.get("kind") or ("full" if m["name"] == "full" else "kv" if method in KV_METHODS
                                 else "pc" if method in PC_METHODS else "drafter")
        if kind not in KINDS:
            raise ValueError(f"method {m['name']!r}: unknown kind {kind!r} (one of {', '.join(KINDS)})")
        extra = sorted({"kv", "kv_params", "budget"} & set(m)) if kind != "pc" else []
        if extra:
            raise ValueError(f"method {m['name']!r}: {', '.join(extra)} apply to kind pc only")
        budget_of = {"kv": "kv", "pc": m.get("budget", "pc")}.get(kind)
        if budget_of not in (None, "kv", "pc") or (budget_of == "kv" and kind == "pc" and not m.get("kv")):
            raise ValueError(f"method {m['name']!r}: budget must be 'pc' or 'kv' (with a kv method), got "
                             f"{m.get('budget')!r}")
        budgets = list(m.get("budgets", cfg["budgets"])) if KINDS[kind][1] else []
        out.append({"name": m["name"], "kind": kind, "method": method, "params": dict(m.get("params") or {}),
                    "budgets": budgets or [None], "kv": m.get("kv"), "kv_params": dict(m.get("kv_params") or {}),
                    "budget_of": budget_of if budgets else None})
    if len({m["name"] for m in out}) != len(out):
        raise ValueError("method names must be unique")
    return out


def _capacity(budget) -> dict:
    return {} if budget is None else {"capacity": budget}


def _kv(spec, target, draft):
    from jaxspec.api import default_stop_ids
    from jaxspec.kv import make_method
    from jaxspec.kv.pipeline import compress_budgets

    def run(prompts, n, budgets, shared):  # compressed caches: the batch's kv methods decode them together
        methods = [make_method(spec["method"], **spec["params"], **_capacity(b)) for b in budgets]
        return compress_budgets(target, prompts, methods, draft=draft if methods[0].needs_draft else None,
                                max_new_tokens=n, stop_ids=default_stop_ids(target), shared=shared)

    return run


def _pc(spec, target, draft):
    from jaxspec.api import default_stop_ids
    from jaxspec.kv import make_method as make_kv
    from jaxspec.pc import make_method as make_pc
    from jaxspec.pc.pipeline import generate_budgets, prefill_budgets

    def run(prompts, n, budgets, shared):  # prefilled caches, decoded with the batch's (but SpecPrefill's: alone)
        if spec["budget_of"] == "kv":
            pcs = [make_pc(spec["method"], **spec["params"])]
            kv = [make_kv(spec["kv"], **spec["kv_params"], **_capacity(b)) for b in budgets]
        else:
            pcs = [make_pc(spec["method"], **spec["params"], **_capacity(b)) for b in budgets]
            kv = make_kv(spec["kv"], **spec["kv_params"]) if spec["kv"] else None
        if pcs[0].keep_positions:
            return generate_budgets(target, prompts, pcs, draft=draft, kv=kv, max_new_tokens=n)
        return prefill_budgets(target, prompts, pcs, draft=draft, kv=kv, max_new_tokens=n,
                               stop_ids=default_stop_ids(target))

    return run


def _drafter(spec, target, draft):
    from jaxspec.drafters import make_drafter
    from jaxspec.speculative import generate_speculative

    drafter = make_drafter(spec["method"], **spec["params"])
    return lambda prompts, n, budgets, shared: [generate_speculative(target, prompts, drafter, draft_model=draft,
                                                                     max_new_tokens=n)]


# kind -> (builder(spec, target, draft) -> run(prompts, max_new_tokens, budgets, shared), takes budgets);
#          ``shared``: the batch's ``SharedPrefills`` (kv methods reuse target prefills)
KINDS: dict[str, tuple[Callable, bool]] = {"full": (_kv, False), "kv": (_kv, True), "pc": (_pc, True),
                                           "drafter": (_drafter, False)}


def deferred(spec: dict) -> bool:
    """Whether a normalised method entry's run returns prefilled (``jaxspec.kv.pipeline.Compressed``) caches,
    decoded with every other such entry's of the batch (``decode_sweeps``) rather than its own results: kv
    methods, and prompt compressors that renumber positions (SpecPrefill prefills and decodes alone)."""
    from jaxspec.pc import METHODS as PC_METHODS

    return spec["kind"] in ("full", "kv") or (spec["kind"] == "pc" and not PC_METHODS[spec["method"]].keep_positions)


def method_runner(spec: dict, target, draft):
    """``run(prompts, max_new_tokens, budgets, shared)`` for a normalised method entry, on one batch of token-id
    prompts: ``[[GenerationResult per prompt] per budget]``, or for ``deferred`` entries the budgets'
    ``jaxspec.kv.pipeline.Compressed`` caches, which ``run`` decodes with every other kv method's of the batch
    (``decode_sweeps``). The budgets of one call share what their method allows (a prefill, a draft scoring
    pass), and kv methods share target prefills through ``shared`` (a ``SharedPrefills`` kept for one batch)."""
    return KINDS[spec["kind"]][0](spec, target, draft)


def prefills_alone(spec: dict) -> bool:
    """Whether a normalised method entry is a kv method whose capturing prefill also serves as the batch's
    plain one (``jaxspec.kv.base.Method.prefills_alone``)."""
    from jaxspec.kv import METHODS as KV_METHODS

    return spec["kind"] == "kv" and KV_METHODS[spec["method"]].prefills_alone


def record_key(task: str, length, method: str, budget, index: int) -> str:
    return json.dumps([task, length, method, budget, index])


def read_records(path: Path) -> list[dict]:
    """Complete records of ``predictions.jsonl``; a half-written last line (a killed run) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def append_record(f, record: dict) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def environment() -> dict:
    """jax version, devices, git commit (and whether the tree is dirty), machine."""
    import jax

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {"jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
            "machine": {"node": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
                        "cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "argv": [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]] if sys.argv and sys.argv[0] else sys.argv,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _resolve(value):
    """A dataset option ``fetch:NAME`` becomes the path of the ``jaxspec fetch`` registry entry NAME."""
    if isinstance(value, str) and value.startswith("fetch:"):
        from jaxspec.fetch import fetch

        return str(fetch(value[len("fetch:"):]))
    return value


def grid(cfg: dict):
    """``(dataset entry, task, length, indices)`` for every dataset, task and length of the config."""
    from experiments.data import dataset_module

    for d in cfg["datasets"]:
        module = dataset_module(d["name"])
        for task in d.get("tasks") or list(module.TASKS):
            for length in d.get("lengths") or [None]:
                yield d, task, length, range(d.get("samples", cfg["samples"]))


def result_record(sample, task, length, spec, budget, result, score, batch: int = 1, tokenizer=None) -> dict:
    """One line of ``predictions.jsonl``; ``timings`` are those of the whole batch of ``batch`` prompts the
    record was generated in. With ``tokenizer``, a lookahead (SpecKV's, SpecPC's) is kept as text."""
    rec = {"key": record_key(task, length, spec["name"], budget, sample.index), "dataset": sample.dataset,
           "task": task, "length": length, "method": spec["name"], "budget": budget, "index": sample.index,
           "prompt_tokens": result.prompt_tokens, "new_tokens": len(result.token_ids),
           "finish_reason": result.finish_reason, "prediction": result.text, "answers": sample.answers,
           "score": score, "tokens_per_second": result.tokens_per_second, "timings": result.timings,
           "meta": {k: v for k, v in sample.meta.items() if k != "all_classes"}, "budget_of": spec["budget_of"],
           "batch": batch}
    if result.kv:
        rec["kv"] = {k: result.kv[k] for k in ("compressed", "kv_bytes_kept", "kv_bytes_full") if k in result.kv}
    if result.pc:
        rec["pc"] = {k: result.pc[k] for k in ("compressed", "tokens_in", "tokens_out", "lookahead_tokens")
                     if k in result.pc}
    for part in ("kv", "pc"):
        acc = getattr(result, part)
        if acc and "lookahead" in acc and tokenizer is not None:
            rec[part]["lookahead"] = tokenizer.decode(acc["lookahead"], skip_special_tokens=False)
    if getattr(result, "accepted_per_step", None):
        rec["accepted_mean"] = result.accepted_per_step["mean"]
        rec["accepted_hist"] = result.accepted_per_step["histogram"]
        rec["target_forwards"] = result.target_forwards
    return rec


def run(cfg: dict, *, on_record: Callable[[dict], None] | None = None, models: tuple | None = None) -> Path:
    """Run (or resume) the grid of ``cfg``; returns the run directory. ``on_record`` is called after each
    record is written; ``models`` = (target, draft) skips loading them."""
    import jaxspec
    from tqdm.auto import tqdm

    from experiments import metrics
    from experiments.data import PromptFormat, dataset_module
    from jaxspec.api import default_stop_ids
    from jaxspec.generation import Sampling
    from jaxspec.kv.pipeline import SharedPrefills, decode_sweeps

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    if (out / "config.yaml").exists():
        old = yaml.safe_load((out / "config.yaml").read_text())
        if identity(old) != identity(cfg):
            raise ValueError(f"{out} holds a run of another model, format, seed or data options: choose another out=")
    write_text(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    write_json(out / "env.json", environment())
    specs = method_specs(cfg)
    path = out / "predictions.jsonl"
    done = {r["key"] for r in read_records(path)}
    jobs = [(d, task, length, i) for d, task, length, indices in grid(cfg) for i in indices]
    settings = [(s, b) for s in specs for b in s["budgets"]]
    total = len(jobs) * len(settings)
    todo = sum(record_key(t, ln, s["name"], b, i) not in done for _, t, ln, i in jobs for s, b in settings)
    if models is None:
        target = jaxspec.load(_resolve(cfg["target"]), dtype=cfg["dtype"], quiet=True)
        draft = jaxspec.load(_resolve(cfg["draft"]), dtype=cfg["dtype"], quiet=True) if cfg["draft"] else None
    else:
        target, draft = models
    runners = {s["name"]: method_runner(s, target, draft) for s in specs}
    size = max(1, int(cfg["batch_size"]))
    with open(path, "a") as f, tqdm(total=total, initial=total - todo, unit="record", dynamic_ncols=True) as bar:
        for d, task, length, indices in grid(cfg):
            missing = {i: {s["name"]: [b for b in s["budgets"] if record_key(task, length, s["name"], b, i) not in done]
                           for s in specs} for i in indices}
            pending = [i for i in indices if any(missing[i].values())]
            fmt = PromptFormat(chat=d.get("chat", cfg["chat"]), system=d.get("system", cfg["system"]))
            options = {k: _resolve(v) for k, v in (d.get("options") or {}).items()}
            if d["name"] == "ruler":
                options.setdefault("seed", cfg["seed"])
            for first in range(0, len(pending), size):
                chunk = pending[first: first + size]
                samples = list(dataset_module(d["name"]).samples(target.tokenizer, task, length=length, indices=chunk,
                                                                 fmt=fmt, **options))
                for i in set(chunk) - {x.index for x in samples}:  # past the end of a finite dataset
                    bar.total -= sum(map(len, missing[i].values()))
                by_n = {}  # one batch per max_new_tokens, so that every record generates what it would alone
                for x in samples:
                    by_n.setdefault(min(x.max_new_tokens, cfg["max_new_tokens"] or x.max_new_tokens), []).append(x)
                for n_new, batch in by_n.items():
                    shared = SharedPrefills()  # e.g. SnapKV, PyramidKV and AdaKV, run in a row, prefill once
                    later = []  # (spec, rows, budgets, prefilled caches, need) of the deferred methods: one decode

                    def write(s, rows, budgets, sweep, need):
                        for b, results in zip(budgets, sweep):
                            for x, result in zip(rows, results):
                                if b not in need[x.index]:  # done before a restart; recomputed for the batch
                                    continue
                                score = metrics.score(x.dataset, task, result.text or "", x.answers, x.meta)
                                rec = result_record(x, task, length, s, b, result, score, batch=len(rows),
                                                    tokenizer=target.tokenizer)
                                append_record(f, rec)
                                done.add(rec["key"])
                                bar.update()
                                if on_record is not None:
                                    on_record(rec)

                    for s in sorted(specs, key=lambda s: not prefills_alone(s)):  # H2O first: its prefill is plain
                        need = {x.index: missing[x.index][s["name"]] for x in batch}
                        rows = [x for x in batch if need[x.index]]
                        budgets = [b for b in s["budgets"] if any(b in need[x.index] for x in rows)]
                        if not rows:
                            continue
                        bar.set_description(f"{task}@{length} {s['name']}" + ("" if budgets == [None] else
                                                                             f"/{budgets}") + f" x{len(rows)}")
                        made = runners[s["name"]]([x.ids for x in rows], n_new, budgets, shared)
                        if deferred(s):
                            later.append((s, rows, budgets, made, need))
                        else:
                            write(s, rows, budgets, made, need)
                    if later:
                        bar.set_description(f"{task}@{length} decode x{sum(len(d[1]) * len(d[2]) for d in later)}")
                        sweeps = decode_sweeps(target, [d[3] for d in later], max_new_tokens=n_new,
                                               sampling=Sampling.make(), stop_ids=default_stop_ids(target))
                        for (s, rows, budgets, _, need), sweep in zip(later, sweeps):
                            write(s, rows, budgets, sweep, need)
    write_json(out / "metrics.json", metrics.aggregate(read_records(path)))
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    from jaxspec.fetch import use_compile_cache

    use_compile_cache()  # a resumed run loads the programs its last start compiled
    out = run(load_config(argv[0], argv[1:]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
