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


@pytest.fixture(scope="module")
def stories():
    import jaxspec

    return jaxspec.load(STORIES, quiet=True)


def tiny_config(out: Path) -> dict:
    cfg = run.load_config(REPO / "experiments" / "configs" / "tiny.yaml", [f"out={out}"])
    assert [d["tasks"] for d in cfg["datasets"]] == [["niah_single_1", "vt"]] and cfg["budgets"] == [64, 128]
    return cfg


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
def test_end_to_end_grid_tables_and_plots(tmp_path, stories):
    out = run.run(tiny_config(tmp_path / "run"), models=(stories, None))
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "env.json", "predictions.jsonl", "metrics.json"}
    env = json.loads((out / "env.json").read_text())
    assert env["jax"] and env["devices"] and "git_commit" in env and env["machine"]["cpus"]
    records = run.read_records(out / "predictions.jsonl")
    assert len(records) == 2 * 2 * 3  # 2 tasks x 2 samples x (full + 2 streamingllm budgets)
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
