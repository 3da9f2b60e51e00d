"""Runner and summaries: config overrides, crash-safe records, resume after a kill, and a tiny end-to-end grid
(stories260K, 2 RULER tasks x {full, streamingllm} x 2 budgets) producing tables and plots."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from experiments import run, summarize

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "assets" / "tinyllamas" / "tinyllamas-stories-260k-f32.gguf"
needs_stories = pytest.mark.skipif(not STORIES.exists(),
                                   reason=f"{STORIES} absent (../shared/assets not beside this checkout)")


def test_config_overrides_and_method_specs(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"target": "m.gguf", "datasets": [{"name": "ruler", "lengths": [1024]}],
                                    "methods": ["full", {"name": "snap", "method": "snapkv", "budgets": [32]},
                                                {"name": "ngram", "params": {"k": 3}}], "budgets": [64, 128]}))
    cfg = run.load_config(path, ["datasets.0.lengths=[256, 512]", "seed=3", "budgets=[16]"])
    assert cfg["datasets"][0]["lengths"] == [256, 512] and cfg["seed"] == 3 and cfg["out"] == "runs/c"
    specs = {s["name"]: s for s in run.method_specs(cfg)}
    assert (specs["full"]["kind"], specs["full"]["budgets"]) == ("full", [None])
    assert (specs["snap"]["kind"], specs["snap"]["method"], specs["snap"]["budgets"]) == ("kv", "snapkv", [32])
    assert (specs["ngram"]["kind"], specs["ngram"]["budgets"]) == ("drafter", [None])
    with pytest.raises(ValueError, match="key=value"):
        run.load_config(path, ["seed"])


def test_read_records_drops_a_half_written_line(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps({"key": "a"}) + "\n" + json.dumps({"key": "b"}) + "\n" + '{"key": "c", "sco')
    assert [r["key"] for r in run.read_records(path)] == ["a", "b"]
    assert path.read_text().endswith('"b"}\n')  # appending continues on a fresh line
    run.write_json(tmp_path / "m.json", {"x": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_summary_of_speculative_records(tmp_path):
    recs = [{"key": str(i), "dataset": "humaneval", "task": "humaneval", "length": None, "method": "ngram",
             "budget": None, "index": i, "score": None, "tokens_per_second": 10.0 + i, "accepted_mean": 1.0 + i,
             "accepted_hist": [1, 2, 3][: 2 + i]} for i in range(2)]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    md, paths = summarize.summarize([str(tmp_path)])
    assert "| humaneval | ngram | 2 | 10.5 | 2.50 |" in md
    assert [p.name for p in paths] == ["accepted_humaneval.png"] and paths[0].stat().st_size > 0


def test_cost_table_takes_medians_of_the_timed_stages(tmp_path):
    def rec(i, method, budget, **t):
        return {"key": f"{method}{budget}{i}", "dataset": "ruler", "task": "niah_single_1", "length": 512,
                "method": method, "budget": budget, "index": i, "score": 1.0,
                "timings": {"load": 99.0, "compile": 50.0 + i, **t}}

    recs = [rec(i, "full", None, prefill=p, decode=1.0) for i, p in enumerate([3.0, 5.0, 40.0])]
    recs += [rec(i, "snapkv", b, draft=0.0, prefill=4.0 + i, score=0.5, decode=1.0) for i in range(2)
             for b in (64, 128)]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    md, _ = summarize.summarize([str(tmp_path)])
    assert "| method | budget | records | prefill | decode | draft | score | total |" in md
    assert "| full | - | 3 | 5.0 | 1.0 | 0.0 | 0.0 | 6.0 |" in md  # the median, not the mean (16.0)
    assert "| snapkv | 64 | 2 | 4.5 | 1.0 | 0.0 | 0.5 | 6.0 |" in md
    assert "| snapkv | all | 4 | 4.5 | 1.0 | 0.0 | 0.5 | 6.0 |" in md
    assert "| full | all |" not in md  # one budget: no summary row


def test_lookahead_table_splits_scores_by_whether_the_lookahead_answered(tmp_path):
    def rec(i, method, score, look, budget=64):
        return {"key": f"{method}{i}", "dataset": "ruler", "task": "niah_single_1", "length": 512,
                "method": method, "budget": budget, "index": i, "score": score, "answers": ["4096"],
                "timings": {}, **({"kv": {"lookahead": look}} if look is not None else {})}

    recs = [rec(0, "speckv", 1.0, " 4096."), rec(1, "speckv", 1.0, " 1234"), rec(2, "speckv", 0.0, " 1234"),
            rec(3, "speckv", 0.0, " 4096"), rec(4, "speckv", 1.0, " 4096"), rec(0, "snapkv", 1.0, None)]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    md, _ = summarize.summarize([str(tmp_path)])
    assert "### lookahead, ruler, length 512" in md
    # 3 of 5 lookaheads name the value; the method scored 2 of those 3 and 1 of the other 2
    assert "| speckv | 64 | 5 | 60.0 | 66.7 (3) | 50.0 (2) |" in md
    assert "| snapkv |" not in md.split("### lookahead")[1].split("### cost")[0]
    (tmp_path / "predictions.jsonl").write_text(json.dumps(recs[-1]) + "\n")
    assert "### lookahead" not in summarize.summarize([str(tmp_path)])[0]  # no lookaheads: no table


@pytest.fixture(scope="module")
def stories():
    import jaxspec

    return jaxspec.load(STORIES, quiet=True)


def tiny_config(out: Path) -> dict:
    cfg = run.load_config(REPO / "experiments" / "configs" / "tiny.yaml", [f"out={out}"])
    assert [d["tasks"] for d in cfg["datasets"]] == [["niah_single_1", "vt"]] and cfg["budgets"] == [64, 128]
    return cfg


@pytest.mark.slow  # many compiles of a full runner grid (.ci/run runs it)
@needs_stories
def test_resume_after_kill(tmp_path, stories):
    cfg = tiny_config(tmp_path / "run")
    written = []

    def kill_after_5(rec):
        written.append(rec["key"])
        if len(written) == 5:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run.run(cfg, on_record=kill_after_5, models=(stories, None))
    path = tmp_path / "run" / "predictions.jsonl"
    first = path.read_text()
    assert len(first.splitlines()) == 5
    with open(path, "a") as f:  # a record half-written when the process died
        f.write('{"key": "[\\"vt\\", 384, \\"full\\", null, 1]", "pred')
    run.run(cfg, models=(stories, None))
    records = run.read_records(path)
    keys = Counter(r["key"] for r in records)
    expected = {run.record_key(t, 384, m, b, i) for t in ("niah_single_1", "vt") for i in (0, 1)
                for m, b in (("full", None), ("streamingllm", 64), ("streamingllm", 128))}
    assert set(keys) == expected and set(keys.values()) == {1}
    assert path.read_text().startswith(first)
    with pytest.raises(ValueError, match="another model"):
        run.run(dict(cfg, seed=1), models=(stories, None))


@needs_stories
def test_end_to_end_grid_tables_and_plots(tmp_path, stories, stage_calls):
    out = run.run(tiny_config(tmp_path / "run"), models=(stories, None))
    assert stage_calls["prefill"] == 2 * 2  # per sample: full's plain prefill serves StreamingLLM's budgets
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "env.json", "predictions.jsonl", "metrics.json"}
    env = json.loads((out / "env.json").read_text())
    assert env["jax"] and env["devices"] and "git_commit" in env and env["machine"]["cpus"]
    records = run.read_records(out / "predictions.jsonl")
    assert len(records) == 2 * 2 * 3  # 2 tasks x 2 samples x (full + 2 streamingllm budgets)
    assert all(r["prediction"] == unshared(stories, r) for r in records if r["method"] == "full")
    squeezed = [r for r in records if r["method"] == "streamingllm"]
    assert all(r["kv"]["kv_bytes_kept"] < r["kv"]["kv_bytes_full"] for r in squeezed)
    assert all(0.0 <= r["score"] <= 1.0 and r["prompt_tokens"] + 128 <= 384 for r in records if r["task"] != "vt")
    rows = json.loads((out / "metrics.json").read_text())
    assert {(r["method"], r["budget"]) for r in rows if r["kind"] == "all"} == {
        ("full", None), ("streamingllm", 64), ("streamingllm", 128)}
    md, paths = summarize.summarize([str(out)])
    assert "| task | full | streamingllm @64 | streamingllm @128 |" in md
    assert "| niah_single_1 |" in md and "| vt |" in md and "| **NIAH** |" in md and "| **All** |" in md
    assert (out / "summary.md").read_text() == md
    assert [p.name for p in paths] == ["score_vs_budget_ruler_384.png"] and paths[0].read_bytes()[:4] == b"\x89PNG"


# --- budget sweeps: one prefill (kv) or one draft scoring pass (pc) per sample and method -------------------

@pytest.fixture
def stage_calls(monkeypatch):
    """Counts of the jitted stages run through the kv and pc pipelines' ``_run``, by function name."""
    from jaxspec.kv import pipeline as kvp
    from jaxspec.pc import pipeline as pcp

    calls = Counter()
    for module in (kvp, pcp):
        def counted(fn, *args, _orig=module._run, **kw):
            calls[fn.__name__] += 1
            return _orig(fn, *args, **kw)

        monkeypatch.setattr(module, "_run", counted)
    return calls


@pytest.fixture(scope="module")
def tiny_pair(tiny_hf):
    import jaxspec

    return (jaxspec.load(tiny_hf("qwen2-bias")[0]), jaxspec.load(tiny_hf("llama-gqa4to2-untied-llama3rope")[0]))


def tiny_prompts():
    import numpy as np

    rng = np.random.default_rng(11)
    return [rng.integers(3, 101, n).tolist() for n in (40, 12, 57)]


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "adakv", "speckv", "speckv-oracle"])
def test_kv_budget_sweep_equals_compress_per_capacity(tiny_pair, stage_calls, name):
    import numpy as np

    from jaxspec.kv import make_method
    from jaxspec.kv.pipeline import compress, compress_budgets

    target, draft = tiny_pair
    use_draft = draft if name == "speckv" else None
    prompts = tiny_prompts()
    methods = [make_method(name, capacity=c, window_size=4, kernel_size=3) for c in (16, 24, 64)]  # 64: keeps all
    swept = compress_budgets(target, prompts, methods, draft=use_draft, max_new_tokens=5)
    # one plain prefill (serving capacity 64 too), scored by feeding the window (and lookahead) rows again
    assert stage_calls["prefill"] == 1 and stage_calls["score_suffix"] == 1 and stage_calls["compress_cache"] == 2
    assert stage_calls["generate_tokens"] == (1 if name == "speckv" else 0)
    assert stage_calls["decode_compressed"] == (1 if name == "speckv-oracle" else 0)  # its answer: from the plain
    for m, got in zip(methods, swept):
        want = compress(target, prompts, m, draft=use_draft, max_new_tokens=5)
        assert got.method == m and got.compressed == want.compressed and got.lookahead == want.lookahead
        for a, b in [(got.cache.k, want.cache.k), (got.cache.v, want.cache.v), (got.cache.pos, want.cache.pos),
                     (got.cache.length, want.cache.length), (got.logits, want.logits), (got.next_pos, want.next_pos)]:
            assert np.array_equal(np.asarray(a), np.asarray(b)), m
    assert [any(c.compressed) for c in swept] == [True, True, False]
    with pytest.raises(Exception, match="differing only in capacity"):
        compress_budgets(target, prompts, [methods[0], make_method(name, capacity=16, window_size=2, kernel_size=3)])


@pytest.mark.parametrize("h2o_first", [False, True])
def test_kv_methods_share_prefills_through_shared_prefills(tiny_pair, stage_calls, h2o_first):
    """StreamingLLM's prefill is the plain one; SnapKV, PyramidKV and AdaKV with equal windows score the same
    rows: run in a row on one batch they prefill once in all and score once. H2O captures every row in a
    prefill of its own, after the plain one; run first, its prefill is the plain one too (the capture leaves
    the cache and logits as they are). Each result equals the method's own sweep, bit for bit."""
    import numpy as np

    from jaxspec.kv import make_method
    from jaxspec.kv.pipeline import SharedPrefills, compress_budgets

    target, _ = tiny_pair
    prompts = tiny_prompts()
    names = ["streamingllm", "snapkv", "pyramidkv", "adakv"]
    names = ["h2o", *names] if h2o_first else [*names, "h2o"]
    params = {"streamingllm": {}, "h2o": {"window_size": 4}}
    sweeps = {n: [make_method(n, capacity=c, **params.get(n, {"window_size": 4, "kernel_size": 3}))
                  for c in (16, 24, 64)] for n in names}
    shared = SharedPrefills()
    got = {n: compress_budgets(target, prompts, sweeps[n], shared=shared) for n in names}
    assert stage_calls["prefill"] == (1 if h2o_first else 2) and stage_calls["score_suffix"] == 1
    assert len(shared) == 2
    stage_calls.clear()
    for n in names:
        want = compress_budgets(target, prompts, sweeps[n])
        for a, b in zip(got[n], want):
            assert a.compressed == b.compressed and a.timings.keys() == b.timings.keys()
            for x, y in [(a.cache.k, b.cache.k), (a.cache.v, b.cache.v), (a.cache.pos, b.cache.pos),
                         (a.logits, b.logits)]:
                assert np.array_equal(np.asarray(x), np.asarray(y)), n
    assert stage_calls["prefill"] == 5  # alone: one each (H2O's serves its uncompressed capacity 64 too)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_budget_sweep_decodes_its_budgets_as_one_batch(tiny_pair, stage_calls, temperature):
    """Greedy, a sweep's compressed caches (capacities 16, 24 and 64: 64 holds every prompt, uncompressed)
    decode in one loop, each row's tokens as its config's ``generate`` alone writes them; sampling decodes
    each config on its own, so that a seed gives what it gives alone."""
    from jaxspec.generation import Sampling
    from jaxspec.kv import make_method
    from jaxspec.kv.pipeline import generate, generate_budgets

    target, _ = tiny_pair
    prompts = tiny_prompts()
    methods = [make_method("snapkv", capacity=c, window_size=4, kernel_size=3) for c in (16, 24, 64)]
    sampling = Sampling.make(temperature)
    swept = generate_budgets(target, prompts, methods, max_new_tokens=6, sampling=sampling, seed=3)
    assert stage_calls["decode_compressed"] == (1 if temperature == 0 else 3)
    for m, results in zip(methods, swept):
        alone = generate(target, prompts, m, max_new_tokens=6, sampling=sampling, seed=3)
        assert [(r.token_ids, r.finish_reason, r.kv["compressed"]) for r in results] == \
            [(r.token_ids, r.finish_reason, r.kv["compressed"]) for r in alone], m
    assert [r.kv["compressed"] for r in swept[-1]] == [False] * len(prompts)


def test_sweeps_of_several_methods_decode_as_one_batch(tiny_pair, stage_calls):
    """The compressed caches of several methods' sweeps (capacities 8 and 12, SpecKV's with its re-fed
    token, PyramidKV's per-layer and AdaKV's per-head budgets) decode greedily in one loop, and ``full``'s
    whole prompt (64 slots: more than ``MERGE_SPREAD`` times 8) in another; each row as its config alone.
    A merged decode's seconds are split among its configs by rows."""
    from jaxspec.kv import make_method
    from jaxspec.kv.pipeline import MERGE_SPREAD, SharedPrefills, compress_budgets, decode_sweeps, generate

    target, draft = tiny_pair
    prompts = tiny_prompts()
    sweeps = {"full": [make_method("full")],
              **{n: [make_method(n, capacity=c, window_size=4, kernel_size=3) for c in (8, 12)]
                 for n in ("pyramidkv", "adakv", "speckv")}}
    shared = SharedPrefills()
    cs = [compress_budgets(target, prompts, ms, draft=draft if n == "speckv" else None, max_new_tokens=6,
                           shared=shared) for n, ms in sweeps.items()]
    assert cs[0][0].cache.capacity > MERGE_SPREAD * 8 >= max(c.cache.capacity for c in sum(cs[1:], []))
    stage_calls.clear()
    got = decode_sweeps(target, cs, max_new_tokens=6)
    assert stage_calls["decode_compressed"] == 2
    assert [len(g) for g in got] == [1, 2, 2, 2] and all(len(r) == len(prompts) for g in got for r in g)
    for (n, ms), g in zip(sweeps.items(), got):
        for m, results in zip(ms, g):
            alone = generate(target, prompts, m, draft=draft if n == "speckv" else None, max_new_tokens=6)
            assert [(r.token_ids, r.finish_reason) for r in results] == \
                [(r.token_ids, r.finish_reason) for r in alone], (n, m)
    for rows in ([r for r in got[0][0]], [r for g in got[1:] for rs in g for r in rs]):
        merged = (sum(len(r.token_ids) for r in rows) - len(rows)) / rows[0].tokens_per_second  # the loop's
        assert [r.timings["decode"] for r in rows] == pytest.approx([merged * len(prompts) / len(rows)] * len(rows))


def test_prompt_compressors_decode_with_the_kv_grid(tiny_pair, stage_calls):
    """SpecPC's and recency's compressed prompts (16 and 24 tokens) and SpecKV-PC's (24 tokens, then 8 and 12
    KV entries), prefilled by ``prefill_budgets``, decode greedily in one loop with SnapKV's caches, and
    ``full``'s whole prompt in another. Each row's tokens are plain generation's on its compressed prompt
    (SpecKV-PC's: ``kv_generate`` with the draft's lookahead); results carry the pc accounting, and kv
    accounting only where a kv method dropped entries."""
    import jaxspec
    from jaxspec.kv import make_method as make_kv
    from jaxspec.kv.pipeline import compress_budgets as kv_budgets, decode_sweeps, generate as kv_generate
    from jaxspec.pc import compress, make_method as make_pc
    from jaxspec.pc.pipeline import prefill_budgets

    target, draft = tiny_pair
    prompts = tiny_prompts()
    spec = dict(window_size=4, starting_layer_index=0, kernel_size=3, lookahead_tokens=3)
    pcs = {n: [make_pc(n, capacity=c, **(spec if n == "specpc" else {})) for c in (16, 24)]
           for n in ("specpc", "recency")}
    skv = [make_kv("speckv", capacity=c, window_size=4, kernel_size=3) for c in (8, 12)]
    sweeps = [kv_budgets(target, prompts, [make_kv("full")]),
              kv_budgets(target, prompts, [make_kv("snapkv", capacity=c, window_size=4) for c in (8, 12)]),
              *(prefill_budgets(target, prompts, ms, draft=draft, max_new_tokens=6) for ms in pcs.values()),
              prefill_budgets(target, prompts, [make_pc("specpc", capacity=24, **spec)], draft=draft, kv=skv,
                              max_new_tokens=6)]
    stage_calls.clear()
    got = decode_sweeps(target, sweeps, max_new_tokens=6)
    assert stage_calls["decode_compressed"] == 2  # the 64-slot full prompt alone, the rest (8-24 slots) together
    for (n, ms), g in zip(pcs.items(), got[2:4]):
        for pc, results in zip(ms, g):
            c = compress(prompts, pc, draft=draft)
            plain = jaxspec.generate(target, c.prompts, max_new_tokens=6, stop_ids=[])
            assert [r.token_ids for r in results] == [r.token_ids for r in plain], (n, pc)
            assert [(r.pc["tokens_out"], r.pc["compressed"]) for r in results] == \
                [(len(p), f) for p, f in zip(c.prompts, c.compressed)]
            assert all(r.kv is None and r.timings["pc_draft"] >= 0 for r in results)
    c = compress(prompts, make_pc("specpc", capacity=24, **spec), draft=draft)
    for kv, results in zip(skv, got[4]):
        again = kv_generate(target, c.prompts, kv, draft=draft, lookahead=c.lookahead, max_new_tokens=6)
        assert [r.token_ids for r in results] == [r.token_ids for r in again], kv
        assert all(r.kv["lookahead"] == r.pc["lookahead"] and r.timings["draft"] == 0 for r in results)


@needs_stories
def test_bench_decode_merge_decodes_a_runner_batch_both_ways(tmp_path):
    """The benchmark builds the tiny grid's batch (full, StreamingLLM at 64 and 128) as the runner does and
    decodes it per config and merged: equal tokens, and its JSON says so."""
    from experiments import bench_decode_merge

    r = bench_decode_merge.main(["--config", str(REPO / "experiments" / "configs" / "tiny.yaml"), "--batch", "2",
                                 "--task", "vt", "--out", str(tmp_path / "m.json")])
    assert r["configs"] == ["full", "streamingllm@64", "streamingllm@128"] and r["rows"] == 6
    assert r["tokens_equal"] and r["rows_differing"] == 0 and r["max_new_tokens"] == 8
    assert sorted(sum(r["groups"], [])) == sorted(r["configs"]) and r["alone_steps"] <= 3 * 8
    assert json.loads((tmp_path / "m.json").read_text())["speedup"] == r["speedup"] > 0


def test_kv_budget_sweep_splits_the_prefill_where_speckv_sparse_rows_differ(tiny_pair, stage_calls):
    """With its 5 lookahead tokens a 79-token prompt passes the sparse threshold (64 + 16); it is scored, so
    sparse, at capacity 16 but not at 78 (``n > capacity + 1`` fails), though both compress it: two prefills,
    each result still equal to ``compress`` alone."""
    import numpy as np

    from jaxspec.kv import SpecKV
    from jaxspec.kv.pipeline import compress, compress_budgets

    target, draft = tiny_pair
    prompts = [np.random.default_rng(3).integers(3, 101, 79).tolist()]
    methods = [SpecKV(capacity=c, window_size=4, kernel_size=3, prefill_window_size=64, prefill_vertical_size=16)
               for c in (16, 24, 78)]
    swept = compress_budgets(target, prompts, methods, draft=draft, max_new_tokens=5)
    assert stage_calls["prefill"] == 2 and stage_calls["generate_tokens"] == 1
    for m, got in zip(methods, swept):
        want = compress(target, prompts, m, draft=draft, max_new_tokens=5)
        assert got.compressed == want.compressed == [True]
        for a, b in [(got.cache.k, want.cache.k), (got.cache.pos, want.cache.pos), (got.logits, want.logits)]:
            assert np.array_equal(np.asarray(a), np.asarray(b)), m


@pytest.mark.parametrize("name", ["specpc", "specprefill", "draft-ppl", "random"])
def test_pc_budget_sweep_scores_once(tiny_pair, stage_calls, name):
    from jaxspec.pc import compress, make_method
    from jaxspec.pc.pipeline import compress_budgets

    target, draft = tiny_pair
    params = {"window_size": 4, **({"starting_layer_index": 0, "kernel_size": 4, "lookahead_tokens": 3}
                                   if name == "specpc" else {})}
    pcs = [make_method(name, capacity=c, **params) for c in (16, 24, 64)]
    prompts = tiny_prompts()
    swept = compress_budgets(prompts, pcs, draft=draft, stop_ids=[7])
    passes = stage_calls["attention_pass"] + stage_calls["surprisal_pass"]
    assert passes == (0 if name == "random" else 1) and stage_calls["select_tokens"] == 2
    for pc, got in zip(pcs, swept):
        want = compress(prompts, pc, draft=draft, stop_ids=[7])
        assert (got.kept, got.prompts, got.compressed, got.lookahead) == (want.kept, want.prompts, want.compressed,
                                                                          want.lookahead)


def sweep_config(out: Path, methods: list, tasks=("niah_single_1", "vt")) -> dict:
    """The tiny config, one sample per task, budgets 64 and 128."""
    return run.load_config(REPO / "experiments" / "configs" / "tiny.yaml",
                           [f"out={out}", "samples=1", f"methods={json.dumps(methods)}",
                            f"datasets.0.tasks={json.dumps(list(tasks))}"])


def unshared(stories, rec, return_ids=False, **kw):
    """The record's prediction recomputed alone with ``jaxspec.generate`` (no sharing across budgets): its
    text, or with ``return_ids`` its token ids."""
    import jaxspec
    from experiments.data import PromptFormat, ruler

    sample = ruler.sample(stories.tokenizer, rec["task"], rec["length"], rec["index"], fmt=PromptFormat(chat=False))
    result = jaxspec.generate(stories, sample.ids, max_new_tokens=8, **kw)
    return list(result.token_ids) if return_ids else result.text


KV_METHODS = [{"name": "snapkv", "params": {"window_size": 8}},
              {"name": "speckv", "params": {"window_size": 8, "lookahead_tokens": 4}}]


@pytest.mark.slow  # many compiles of a full runner grid (.ci/run runs it)
@needs_stories
def test_kv_budgets_share_one_prefill_per_sample(tmp_path, stories, stage_calls):
    from jaxspec.kv import make_method

    cfg = sweep_config(tmp_path / "run", KV_METHODS)
    out = run.run(cfg, models=(stories, stories))
    records = run.read_records(out / "predictions.jsonl")
    assert len(records) == 2 * 2 * 2  # 2 tasks x 1 sample x 2 methods x 2 budgets
    assert all(r["kv"]["compressed"] and r["budget_of"] == "kv" for r in records)
    assert stage_calls["prefill"] == 2  # per sample: the plain prefill, which each method scores once
    assert stage_calls["score_suffix"] == 2 * 2
    assert stage_calls["generate_tokens"] == 2  # speckv's draft lookahead, once per sample
    assert stage_calls["compress_cache"] == len(records)
    stage_calls.clear()
    for rec in records:
        spec = next(m for m in KV_METHODS if m["name"] == rec["method"])
        kv = make_method(spec["name"], **spec["params"], capacity=rec["budget"])
        assert rec["prediction"] == unshared(stories, rec, kv=kv, draft=stories if kv.needs_draft else None), rec["key"]
        if kv.needs_draft:  # the record keeps the draft's lookahead: here the same model's first 4 greedy tokens
            plain = unshared(stories, rec, return_ids=True)[:4]
            assert rec["kv"]["lookahead"] == stories.tokenizer.decode(plain, skip_special_tokens=False)
        else:
            assert "lookahead" not in rec["kv"]


@needs_stories
def test_h2o_runs_first_and_its_prefill_serves_the_batch(tmp_path, stories, stage_calls):
    """Listed last, H2O still runs first in its batch, and its capturing prefill is the only target prefill:
    ``full``, StreamingLLM and SnapKV (scored by feeding its window again) reuse it. All 7 configs then decode
    as one batch, in one loop; each record as alone."""
    from jaxspec.kv import make_method

    methods = ["full", {"name": "streamingllm", "params": {"sink_size": 4}},
               {"name": "snapkv", "params": {"window_size": 8}}, {"name": "h2o", "params": {"window_size": 8}}]
    cfg = sweep_config(tmp_path / "run", methods, tasks=("niah_single_1",))
    seen = []
    out = run.run(cfg, models=(stories, stories), on_record=lambda r: seen.append(r["method"]))
    records = run.read_records(out / "predictions.jsonl")
    assert len(records) == 1 + 3 * 2 and seen[:2] == ["h2o", "h2o"]
    assert stage_calls["prefill"] == 1 and stage_calls["score_suffix"] == 1
    assert stage_calls["decode_compressed"] == 1 and {r["batch"] for r in records} == {1}
    assert len({r["timings"]["decode"] for r in records}) == 1  # the merged decode, a seventh to each record
    for rec in records:
        spec = next(m for m in methods if isinstance(m, dict) and m["name"] == rec["method"]) \
            if rec["method"] != "full" else None
        kv = None if spec is None else make_method(spec["name"], **spec["params"], capacity=rec["budget"])
        assert rec["prediction"] == unshared(stories, rec, kv=kv), rec["key"]


@needs_stories
def test_resume_after_kill_inside_a_budget_sweep(tmp_path, stories, stage_calls):
    cfg = sweep_config(tmp_path / "run", ["full", KV_METHODS[0]])
    seen = []

    def kill_inside_the_first_sweep(rec):
        seen.append(rec["key"])
        if rec["method"] == "snapkv":
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run.run(cfg, on_record=kill_inside_the_first_sweep, models=(stories, None))
    assert [json.loads(k)[2:4] for k in seen] == [["full", None], ["snapkv", 64]]
    stage_calls.clear()
    out = run.run(cfg, models=(stories, None))
    records = run.read_records(out / "predictions.jsonl")
    keys = Counter(r["key"] for r in records)
    expected = {run.record_key(t, 384, m, b, 0) for t in ("niah_single_1", "vt")
                for m, b in (("full", None), ("snapkv", 64), ("snapkv", 128))}
    assert set(keys) == expected and set(keys.values()) == {1}
    assert stage_calls["compress_cache"] == 4 - 1  # the restart computes only the budgets left
    fresh = run.run(dict(cfg, out=str(tmp_path / "fresh")), models=(stories, None))
    want = {r["key"]: r["prediction"] for r in run.read_records(fresh / "predictions.jsonl")}
    assert {r["key"]: r["prediction"] for r in records} == want


@needs_stories
def test_batched_run_resumes_and_equals_batch_1(tmp_path, stories, stage_calls):
    cfg = dict(sweep_config(tmp_path / "run", ["full", KV_METHODS[0]], tasks=["niah_single_1"]), samples=3,
               batch_size=2)
    seen = []

    def kill_inside_the_first_batch(rec):
        seen.append(rec)
        if len(seen) == 3:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run.run(cfg, on_record=kill_inside_the_first_batch, models=(stories, None))
    assert [(r["index"], r["method"], r["budget"], r["batch"]) for r in seen] == [
        (0, "full", None, 2), (1, "full", None, 2), (0, "snapkv", 64, 2)]
    stage_calls.clear()
    out = run.run(cfg, models=(stories, None))
    records = run.read_records(out / "predictions.jsonl")
    keys = Counter(r["key"] for r in records)
    assert set(keys) == {run.record_key("niah_single_1", 384, m, b, i) for i in range(3)
                         for m, b in (("full", None), ("snapkv", 64), ("snapkv", 128))}
    assert set(keys.values()) == {1}
    # the restart: batch [0, 1] runs snapkv's two budgets (sample 0 needs only 128), batch [2] full and both;
    # one plain prefill a batch (batch [2]'s serves full and snapkv)
    assert stage_calls["prefill"] == 1 + 1 and stage_calls["compress_cache"] == 2 + 2
    assert {r["batch"] for r in records if r["index"] == 2} == {1}
    fresh = run.run(dict(cfg, out=str(tmp_path / "fresh"), batch_size=1), models=(stories, None))
    want = {r["key"]: r["prediction"] for r in run.read_records(fresh / "predictions.jsonl")}
    assert {r["key"]: r["prediction"] for r in records} == want


PC_METHODS = [
    {"name": "specpc", "params": {"window_size": 16, "kernel_size": 8, "lookahead_tokens": 2, "starting_layer_index": 0}},
    "recency",
    {"name": "speckv-pc", "kind": "pc", "method": "specpc", "budget": "kv",
     "params": {"capacity": 192, "window_size": 16, "kernel_size": 8, "lookahead_tokens": 3, "starting_layer_index": 0},
     "kv": "speckv", "kv_params": {"window_size": 8}},
]


@pytest.mark.slow  # many compiles of a full runner grid (.ci/run runs it)
@needs_stories
def test_pc_kind_end_to_end(tmp_path, stories, stage_calls):
    from jaxspec.kv import make_method as make_kv
    from jaxspec.pc import make_method as make_pc

    cfg = sweep_config(tmp_path / "run", PC_METHODS, tasks=["niah_single_1"])
    specs = {s["name"]: s for s in run.method_specs(cfg)}
    assert [specs[n]["kind"] for n in ("specpc", "recency", "speckv-pc")] == ["pc"] * 3
    assert [specs[n]["budget_of"] for n in ("specpc", "recency", "speckv-pc")] == ["pc", "pc", "kv"]
    out = run.run(cfg, models=(stories, stories))
    records = run.read_records(out / "predictions.jsonl")
    assert len(records) == 3 * 2  # 1 sample x 3 methods x 2 budgets
    assert stage_calls["attention_pass"] == 2  # the specpc sweep's, the speckv-pc compression's
    # a target prefill per compressed prompt batch: specpc's 2, recency's 2, speckv-pc's 1 for both kv budgets
    assert stage_calls["prefill"] == 5
    assert stage_calls["decode_compressed"] == 1  # every budget of every method: one greedy decode loop
    assert stage_calls["generate_tokens"] == 0  # SpecKV-PC reuses SpecPC's lookahead
    for rec in records:
        if rec["method"] == "speckv-pc":
            assert rec["pc"]["tokens_out"] == 192 and rec["kv"]["compressed"] and rec["budget_of"] == "kv"
            kw = dict(pc=make_pc("specpc", **PC_METHODS[2]["params"]), kv=make_kv("speckv", window_size=8,
                                                                                   capacity=rec["budget"]))
        else:
            params = PC_METHODS[0]["params"] if rec["method"] == "specpc" else {}
            assert rec["pc"]["tokens_out"] == rec["budget"] < rec["pc"]["tokens_in"] and "kv" not in rec
            kw = dict(pc=make_pc(rec["method"], **params, capacity=rec["budget"]))
        assert rec["prediction"] == unshared(stories, rec, draft=stories, **kw), rec["key"]
    look = {r["method"]: r["pc"].get("lookahead") for r in records if r["budget"] == 64}
    assert look["recency"] is None and look["specpc"] and look["speckv-pc"]  # attention methods keep theirs
    assert all(r["kv"]["lookahead"] == r["pc"]["lookahead"] for r in records if r["method"] == "speckv-pc")
    md, paths = summarize.summarize([str(out)])
    assert "| task | specpc @64 | specpc @128 | recency @64 | recency @128 | speckv-pc @64 | speckv-pc @128 |" in md
    assert [p.name for p in paths] == ["score_vs_budget_ruler_384.png"]


def test_pc_example_config_resolves():
    cfg = run.load_config(REPO / "experiments" / "configs" / "qwen-coder-ruler-pc.yaml")
    specs = {s["name"]: s for s in run.method_specs(cfg)}
    assert {s["kind"] for n, s in specs.items() if n != "full"} == {"pc"}
    assert specs["speckv-pc"]["budget_of"] == "kv" and specs["speckv-pc"]["kv"] == "speckv"
    with pytest.raises(ValueError, match="budget must be"):
        run.method_specs(dict(cfg, methods=[{"name": "specpc", "budget": "kv"}]))
    with pytest.raises(ValueError, match="kind pc only"):
        run.method_specs(dict(cfg, methods=[{"name": "snapkv", "kv": "speckv"}]))


@pytest.mark.parametrize("path", sorted((REPO / "experiments" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_resolves(path):
    """Each config in experiments/configs names known tasks and builds every method at every budget (a typo
    would otherwise surface hours into a run, at the first sample of that method)."""
    from experiments.data import dataset_module
    from jaxspec.drafters import make_drafter
    from jaxspec.kv import make_method as make_kv
    from jaxspec.pc import make_method as make_pc

    cfg = run.load_config(path)
    for d in cfg["datasets"]:
        assert set(d.get("tasks") or []) <= set(dataset_module(d["name"]).TASKS), d
    for s in run.method_specs(cfg):
        for b in s["budgets"]:
            cap = {} if b is None else {"capacity": b}
            if s["kind"] == "kv":
                make_kv(s["method"], **s["params"], **cap)
            elif s["kind"] == "pc":
                make_pc(s["method"], **s["params"], **({} if s["budget_of"] == "kv" else cap))
                if s["kv"]:
                    make_kv(s["kv"], **s["kv_params"], **(cap if s["budget_of"] == "kv" else {}))
            elif s["kind"] == "drafter":
                make_drafter(s["method"], **s["params"])
