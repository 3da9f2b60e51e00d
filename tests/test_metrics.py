"""Metrics against hand-computed cases (RULER string match, LongBench QA-F1, ROUGE-L, classification, code
similarity), aggregation with categories, and the LongBench / HumanEval loaders on fixture files."""

from __future__ import annotations

import gzip
import json

import pytest

from experiments import metrics
from experiments.data import PromptFormat, category, longbench
from experiments.data import humaneval


def test_ruler_string_match_and_postprocessing():
    assert metrics.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert metrics.string_match_all("FOO-bar is 1", ["foo-BAR"]) == 1.0
    assert metrics.string_match_part("it is Paris", ["London", "paris"]) == 1.0
    assert metrics.string_match_part("it is Rome", ["London", "paris"]) == 0.0
    assert metrics.format_prediction("reasoning... Answer: 42 Summary: done") == " done"
    assert metrics.ruler_postprocess("  a\tb\x01c \n") == "a\nb\nc"
    assert metrics.score("ruler", "niah_multivalue", "Answer: 1, 2\tand 3", ["1", "2", "4"]) == pytest.approx(2 / 3)
    assert metrics.score("ruler", "qa_1", "The answer is: the Eiffel tower", ["eiffel tower", "x"]) == 1.0


def test_qa_f1():
    # normalised: "cat sat on mat" vs "cat on mat": 3 common, P = 3/4, R = 1
    assert metrics.normalize_answer("The cat, sat on  the mat!") == "cat sat on mat"
    assert metrics.qa_f1_score("The cat sat on the mat.", "a cat on a mat") == pytest.approx(2 * 0.75 / 1.75)
    assert metrics.qa_f1_score("dog", "cat") == 0.0
    # max over answers, then x 1 (per sample); triviaqa scores the first line only
    assert metrics.longbench_score("triviaqa", "\nParis\nLondon", ["London", "Paris"]) == 1.0
    assert metrics.longbench_score("triviaqa", "Lyon\nParis", ["Paris"]) == 0.0


def test_rouge_l():
    pytest.importorskip("rouge", reason="the `rouge` package (LongBench's ROUGE) is not installed")
    # The rouge package counts LCS hits and lengths over distinct words: reference {the, cat, was, on, mat},
    # hypothesis {the, cat, sat, on, mat}, LCS "the cat on the mat" -> 4 distinct hits: P = R = F = 4/5.
    assert metrics.rouge_score("the cat sat on the mat", "the cat was on the mat") == pytest.approx(0.8)
    # LCS "a c": R = 2/5, P = 2/4, F = 2PR/(P+R) = 4/9
    assert metrics.rouge_score("a b c d", "a x c y z") == pytest.approx(4 / 9)
    assert metrics.rouge_score("", "anything") == 0.0
    assert metrics.longbench_score("samsum", "a b c d\nignored line", ["a x c y z"]) == pytest.approx(4 / 9)


def test_classification_score():
    classes = ["Location", "Human", "Entity", "Human being"]
    assert metrics.classification_score("Location", "Location", all_classes=classes) == 1.0
    assert metrics.classification_score("Location or Entity", "Location", all_classes=classes) == 0.5
    assert metrics.classification_score("Human", "Location", all_classes=classes) == 0.0
    # "Human" is a substring of the gold "Human being" and is dropped: 1 / 1
    assert metrics.classification_score("Human being", "Human being", all_classes=classes) == 1.0


def test_code_similarity():
    # first line without ` # //: "x = foo(1)" vs "x = foo(2)": difflib ratio 2 * 9 / 20 = 0.9
    assert metrics.code_sim_score("```python\n# comment\nx = foo(1)\n", "x = foo(2)") == pytest.approx(0.9)
    assert metrics.fuzz_ratio("abcd", "abce") == 75
    assert metrics.code_sim_score("// only comments", "x") == 0.0
    assert metrics.score("longbench", "lcc", "Next line of code:\nreturn a + b", ["return a + b"]) == 1.0


def test_aggregate_categories():
    recs = [{"dataset": "ruler", "length": 4096, "method": "full", "budget": None, "task": t, "score": s}
            for t, s in [("niah_single_1", 1.0), ("niah_single_1", 0.0), ("niah_single_2", 1.0), ("vt", 0.25)]]
    rows = {(r["kind"], r["task"]): r for r in metrics.aggregate(recs)}
    assert rows[("task", "niah_single_1")]["score"] == 50.0 and rows[("task", "niah_single_1")]["n"] == 2
    assert rows[("category", "NIAH")]["score"] == 75.0  # mean of the task means 50 and 100
    assert rows[("category", "Multi-hop tracing")]["score"] == 25.0
    assert rows[("all", "All")]["score"] == pytest.approx((50 + 100 + 25) / 3)


def test_longbench_categories_are_not_swapped():
    assert category("longbench", "narrativeqa") == "Single-Doc QA"
    assert category("longbench", "hotpotqa") == "Multi-Doc QA"
    assert sorted(t for ts in longbench.CATEGORIES.values() for t in ts) == sorted(longbench.PROMPTS)
    assert len(longbench.PROMPTS) == 14


class WordTokenizer:
    """Whitespace tokenizer with a BOS (id 1) and a visible chat template."""

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [len(w) + 2 for w in text.split()]

    def apply_chat_template(self, messages):
        return "<user> " + messages[-1]["content"] + " <assistant>"


def test_longbench_loader(tmp_path):
    rows = [{"input": f"question {i}", "context": f"context {i}", "answers": [f"answer {i}"],
             "all_classes": ["A", "B"]} for i in range(3)]
    for task in ("qasper", "trec"):
        (tmp_path / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = WordTokenizer()
    qasper = list(longbench.samples(tok, "qasper", indices=[0, 2, 9], fmt=PromptFormat(), data_dir=tmp_path))
    assert [s.index for s in qasper] == [0, 2]  # index 9 is past the end
    rules = ("as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
             "answered based on the information in the article, write \"unanswerable\". If the question is a yes/no "
             "question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.")
    assert qasper[1].text == (f"You are given a scientific article and a question. Answer the question {rules}\n\n"
                              f"Article: context 2\n\n Answer the question based on the above article {rules}\n\n"
                              "Question: question 2\n\nAnswer:")
    assert qasper[1].ids == tok.encode(tok.apply_chat_template([{"content": qasper[1].text}]), False)
    assert qasper[0].max_new_tokens == 128 and qasper[0].answers == ["answer 0"]
    (trec,) = longbench.samples(tok, "trec", indices=[1], fmt=PromptFormat(), data_dir=tmp_path)
    assert trec.ids == tok.encode(trec.text)  # few-shot tasks: no chat template, BOS
    assert trec.text.endswith("context 1\nquestion 1") and trec.max_new_tokens == 64
    assert trec.meta["all_classes"] == ["A", "B"]
    assert metrics.score("longbench", "trec", "A\nB", ["A"], trec.meta) == 1.0


def test_humaneval_loader(tmp_path):
    path = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(2):
            f.write(json.dumps({"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(x):\n", "canonical_solution":
                                "    return x\n", "test": "", "entry_point": f"f{i}"}) + "\n")
    got = list(humaneval.samples(WordTokenizer(), indices=[1, 5], fmt=PromptFormat(chat=False), path=path))
    assert len(got) == 1 and got[0].text == "def f1(x):\n" and got[0].meta["task_id"] == "HumanEval/1"
    assert metrics.score("humaneval", "humaneval", "anything", got[0].answers) is None
