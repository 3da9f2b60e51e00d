"""Scores: RULER string matching and the LongBench v1 metrics, per sample in [0, 1], plus aggregation.

* ``format_prediction`` (both benchmarks, as the SpecKV reference code does): keep the text after the last of
  a few answer tags; RULER then strips and maps control characters to newlines (``ruler_postprocess``).
* RULER: ``string_match_all`` (fraction of references found, case-insensitive) and ``string_match_part`` (1 if
  any is found).
* LongBench (``THUDM/LongBench`` ``metrics.py``): QA-F1 over normalised tokens (lower case, no punctuation, no
  articles), ROUGE-L F1 from the ``rouge`` package (the one LongBench uses), the classification score, and code
  similarity: fuzzywuzzy's ``ratio`` (without python-Levenshtein it is difflib's, as here) against the first
  line of the prediction without a backquote, ``#`` or ``//``. trec, triviaqa and samsum score the first line
  only; the score is the max over the gold answers.

``score(dataset, task, prediction, answers, meta)`` dispatches per task; ``aggregate(records)`` turns run
records into table rows (mean x 100 per task, plus category and overall averages of the task means).
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from difflib import SequenceMatcher

PUNCTUATION = set(string.punctuation)
ANSWER_TAGS = ("<think/>", "Answer:", "Summary:", "The final answer is:", "The answer is:", "Next line of code:")


def format_prediction(text: str) -> str:
    """The text after the last occurrence of the last-listed tag it contains, tags tried in order."""
    for tag in ANSWER_TAGS:
        text = text.split(tag)[-1]
    return text


def ruler_postprocess(text: str) -> str:
    """RULER: strip, control characters to newlines, strip again."""
    return re.sub(r"[\x00-\x1f]", "\n", text.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Fraction of ``references`` that occur in ``prediction``, case-insensitively."""
    p = prediction.lower()
    return sum(r.lower() in p for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1.0 if any of ``references`` occurs in ``prediction`` (case-insensitive), else 0.0."""
    p = prediction.lower()
    return float(any(r.lower() in p for r in references))


def normalize_answer(s: str) -> str:
    """SQuAD/LongBench normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    """Token-level F1 between the normalised prediction and ground truth."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def rouge_score(prediction: str, ground_truth: str, **_) -> float:
    """ROUGE-L F of the ``rouge`` package (0 where it refuses, e.g. an empty prediction, as in LongBench)."""
    from rouge import Rouge

    try:
        return Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"]
    except (ValueError, RecursionError):
        return 0.0


def classification_score(prediction: str, ground_truth: str, all_classes=(), **_) -> float:
    """LongBench's: the classes named in the prediction, minus those that are substrings of the (different)
    ground truth; 1/len of them if the ground truth is among them. (The reference removes from the list it
    iterates, which skips the element after each removal; reproduced.)"""
    matches = [c for c in all_classes if c in prediction]
    for term in matches:  # removes from the list it iterates, as the reference does
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy ``fuzz.ratio`` (pure-Python variant): rounded 100 x difflib similarity, 0 if either is empty."""
    if not a or not b:
        return 0
    return int(round(100 * SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
    """Similarity of the first prediction line without a backquote, ``#`` or ``//`` to the ground truth."""
    line = next((ln for ln in prediction.lstrip("\n").split("\n") if "`" not in ln and "#" not in ln
                 and "//" not in ln), "")
    return fuzz_ratio(line, ground_truth) / 100


LONGBENCH_METRICS = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score, "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score, "musique": qa_f1_score, "gov_report": rouge_score, "qmsum": rouge_score,
    "multi_news": rouge_score, "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_score,
    "lcc": code_sim_score, "repobench-p": code_sim_score,
}
FIRST_LINE_ONLY = ("trec", "triviaqa", "samsum")


def longbench_score(task: str, prediction: str, answers: list[str], all_classes=()) -> float:
    """LongBench ``scorer`` for one sample: max over gold answers."""
    if task in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = LONGBENCH_METRICS[task]
    return max((metric(prediction, gt, all_classes=all_classes) for gt in answers), default=0.0)


def score(dataset: str, task: str, prediction: str, answers: list[str], meta: dict | None = None) -> float | None:
    """Score in [0, 1] of one prediction (None for datasets scored elsewhere, e.g. HumanEval)."""
    if dataset == "ruler":
        from experiments.data.ruler import METRIC, TASKS

        pred = ruler_postprocess(format_prediction(prediction))
        fn = string_match_all if METRIC[TASKS[task]["kind"]] == "string_match_all" else string_match_part
        return fn(pred, answers)
    if dataset == "longbench":
        return longbench_score(task, format_prediction(prediction), answers, (meta or {}).get("all_classes") or ())
    return None


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def aggregate(records: list[dict]) -> list[dict]:
    """Table rows from run records: one per (dataset, length, method, budget, task) with ``score`` (mean x 100,
    None when unscored), ``n`` and speed/acceptance means where present; then per category and ``All``
    (means of the task scores; ``task`` is the category name, ``kind`` says which)."""
    from experiments.data import category

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["length"], r["method"], r["budget"], r["task"])].append(r)
    rows = []
    for (ds, length, method, budget, task), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        scores = [r["score"] for r in rs if r.get("score") is not None]
        accepted = [r["accepted_mean"] + 1 for r in rs if r.get("accepted_mean") is not None]
        rows.append({"dataset": ds, "length": length, "method": method, "budget": budget, "task": task,
                     "kind": "task", "category": category(ds, task), "n": len(rs),
                     "score": None if not scores else 100 * _mean(scores),
                     "tokens_per_second": _mean([r["tokens_per_second"] for r in rs if "tokens_per_second" in r]),
                     "tokens_per_forward": _mean(accepted)})
    by_setting: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row["score"] is not None:
            by_setting[(row["dataset"], row["length"], row["method"], row["budget"])].append(row)
    summary = []
    for (ds, length, method, budget), task_rows in by_setting.items():
        cats: dict[str, list[float]] = defaultdict(list)
        for row in task_rows:
            if row["category"]:
                cats[row["category"]].append(row["score"])
        for name, xs in [*cats.items(), ("All", [r["score"] for r in task_rows])]:
            summary.append({"dataset": ds, "length": length, "method": method, "budget": budget, "task": name,
                            "kind": "all" if name == "All" else "category", "category": None,
                            "n": len(xs), "score": _mean(xs)})
    return rows + summary
