"""Draft/target correlation diagnostic: Pearson/Spearman (average ranks for ties) against hand-computed cases;
on tiny random models a draft identical to the target correlates perfectly, outputs are written, runs are
deterministic; the CLI end to end on stories260K (tokenizer for the RULER / HumanEval prompt mix)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from experiments.correlation import Settings, correlate, main, pearson, rankdata, spearman, write_outputs
from experiments.data import Sample

SETTINGS = Settings(lookahead=6, pc_lookahead=3, pc_window=8, pc_start_layer=0, kv_window=4)
STORIES = Path(__file__).resolve().parents[2] / "shared" / "assets" / "tinyllamas" / "tinyllamas-stories-260k-f32.gguf"


def test_pearson_and_spearman_by_hand():
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # centred: (-1,0,1).(-1,1,0) / (sqrt 2 sqrt 2)
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([[1, 2], [3, 4]], [[4, 3], [2, 1]]) == pytest.approx(-1.0)  # flattened
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert rankdata([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert rankdata([3, 3, 3]).tolist() == [2, 2, 2]
    assert rankdata([0.5, -1, 7, 0.5, 0.5]).tolist() == [3, 1, 5, 3, 3]
    assert spearman([1, 2, 3], [1, 4, 9]) == pytest.approx(1.0)  # monotone, not linear
    # ranks x 1..5, y (5,6,7,8,7) -> (1,2,3.5,5,3.5): sum dx dy = 8, sum dx^2 = 10, sum dy^2 = 9.5
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95))


@pytest.fixture(scope="module")
def pair(tiny_hf):
    import jaxspec

    return jaxspec.load(tiny_hf("qwen2-bias")[0]), jaxspec.load(tiny_hf("llama-gqa4to2-untied-llama3rope")[0])


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(5)
    return [Sample("random", "t", i, "", rng.integers(3, 101, n).tolist(), [], 6) for i, n in enumerate((40, 57))]


def test_identical_draft_and_target_correlate_perfectly(pair, samples):
    target, _ = pair
    report, _ = correlate(target, target, samples, SETTINGS, progress=False)
    for rec in report["prompts"]:
        assert rec["pc"]["pearson"] == pytest.approx(1.0) and rec["pc"]["spearman"] == pytest.approx(1.0)
        kv = rec["kv"]
        assert kv["lookahead_tokens"]["draft"] == kv["lookahead_tokens"]["oracle"] == kv["common_prefix"] == 6
        assert kv["candidates"] == rec["prompt_tokens"] - SETTINGS.kv_window - 1
        d = kv["draft_vs_oracle"]
        assert d["pearson"] == pytest.approx(1.0) and d["spearman"] == pytest.approx(1.0)
        assert d["per_layer"]["pearson"] == pytest.approx([1.0, 1.0])
        assert -1 <= kv["window_vs_oracle"]["pearson"] < 1 - 1e-6  # the window alone is not the oracle
    assert report["mean"]["pc"]["pearson"] == pytest.approx(1.0) and report["mean"]["prompts"] == 2


def test_outputs_written_and_deterministic(pair, samples, tmp_path):
    target, draft = pair
    report, points = correlate(target, draft, samples, SETTINGS, progress=False)
    again, _ = correlate(target, draft, samples, SETTINGS, progress=False)
    assert json.dumps(report) == json.dumps(again)
    figures = [report["mean"]["pc"]["pearson"], report["mean"]["kv"]["draft_vs_oracle"]["spearman"],
               *report["mean"]["kv"]["window_vs_oracle"]["per_layer"]["pearson"]]
    assert all(-1 <= x <= 1 for x in figures)
    assert set(report["mean_by_dataset"]) == {"random"}
    candidates = 2 * 2 * (40 - 5 + 57 - 5)  # layers x kv heads x positions [0, n - W - 1) of both prompts
    assert {k: len(v[0]) for k, v in points.items()} == {"pc": 40 + 57, "kv_draft": candidates, "kv_window": candidates}
    paths = write_outputs(report, points, tmp_path / "out")
    assert [p.name for p in paths] == ["correlation.json", "correlation.png"]
    assert json.loads(paths[0].read_text())["prompts"][1]["prompt_tokens"] == 57
    assert paths[1].read_bytes()[:4] == b"\x89PNG"


def test_resume_from_the_log_gives_the_same_report(pair, samples, tmp_path, monkeypatch):
    import experiments.correlation as corr

    target, draft = pair
    log = tmp_path / "prompts.jsonl"
    whole, whole_points = correlate(target, draft, samples, SETTINGS, progress=False)
    correlate(target, draft, samples[:1], SETTINGS, progress=False, log=log)  # "interrupted" after one prompt
    with open(log, "a") as f:
        f.write('{"key": "half-writ')  # and killed mid-line
    calls = []
    real = corr.prompt_figures
    monkeypatch.setattr(corr, "prompt_figures", lambda *a: calls.append(a[2]) or real(*a))
    resumed, resumed_points = correlate(target, draft, samples, SETTINGS, progress=False, log=log)
    assert calls == [samples[1]]  # only the missing prompt ran
    assert json.dumps(resumed) == json.dumps(whole) and resumed_points == whole_points
    assert len(log.read_text().splitlines()) == 2
    with pytest.raises(ValueError, match="other settings"):
        correlate(target, draft, samples, SETTINGS, progress=False, log=log, identity={"target": "another"})


@pytest.mark.slow  # the whole CLI on both prompt kinds (.ci/run runs it)
@pytest.mark.skipif(not STORIES.exists(), reason=f"{STORIES} absent")
def test_cli_on_the_prompt_mix(tmp_path, capsys):
    main(["--target", str(STORIES), "--draft", str(STORIES), "--prompts", "2", "--length", "384", "--no-chat",
          "--out", str(tmp_path), "--lookahead", "4", "--pc-lookahead", "2", "--pc-window", "16",
          "--pc-start-layer", "0", "--kv-window", "8", "--json"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "RULER tasks left out" in captured.err
    assert [(r["dataset"], r["task"]) for r in report["prompts"]] == [("ruler", "niah_single_1"),
                                                                      ("humaneval", "humaneval")]
    assert report["mean"]["pc"]["pearson"] == pytest.approx(1.0)  # the same model drafts for itself
    # at 384 tokens the long-haystack tasks cannot fit: left out and reported, the mix goes on with the others
    assert "cwe" in report["ruler_tasks_left_out"] and "niah_single_1" not in report["ruler_tasks_left_out"]
    assert report["environment"]["git_commit"] is not None and report["command"].startswith("python -m")
    assert (tmp_path / "correlation.json").exists() and (tmp_path / "correlation.png").exists()
