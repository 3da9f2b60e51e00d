"""LongBench v1 (``THUDM/LongBench``), the 14 English non-synthetic tasks, from local ``{task}.jsonl`` files.

Each line holds ``input``, ``context``, ``answers`` (list) and, for trec, ``all_classes``. Prompts are the
standard ``dataset2prompt`` templates (narrativeqa keeps its "asconcisely" typo), never truncated (as in the
SpecKV evaluation). The chat template is applied except for the few-shot and code tasks (trec, triviaqa,
samsum, lcc, repobench-p), which are tokenized raw with the tokenizer's default special tokens. Categories
follow LongBench's own grouping (the SpecKV reference code swaps the single- and multi-doc labels).
"""

from __future__ import annotations

import json
from pathlib import Path

from experiments.data import PromptFormat, Sample

_MULTI_DOC = ("Answer the question based on the given passages. Only give me the answer and do not output any other "
              "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given "
              "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:")
_QASPER_RULES = ("as concisely as you can, using a single phrase or sentence if possible. If the question cannot be "
                 "answered based on the information in the article, write \"unanswerable\". If the question is a "
                 "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.")
PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
                   "question asconcisely as you can, using a single phrase if possible. Do not provide any "
                   "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as "
                   "you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}"
                   "\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question " + _QASPER_RULES
              + "\n\nArticle: {context}\n\n Answer the question based on the above article " + _QASPER_RULES
              + "\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
                       "based on the above text, only give me the answer and do not output any other words.\n\n"
                       "Question: {input}\nAnswer:",
    "hotpotqa": _MULTI_DOC,
    "2wikimqa": _MULTI_DOC,
    "musique": _MULTI_DOC,
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
                  "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
             "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
             "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news articles. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
                  "Now, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n"
            "{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other "
                "words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n"
              "{input}",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
MAX_NEW_TOKENS = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
                  "musique": 32, "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32,
                  "samsum": 128, "lcc": 64, "repobench-p": 64}
NO_CHAT = ("trec", "triviaqa", "samsum", "lcc", "repobench-p")
TASKS = {t: {} for t in PROMPTS}
CATEGORIES = {
    "Single-Doc QA": ["narrativeqa", "qasper", "multifieldqa_en"],
    "Multi-Doc QA": ["hotpotqa", "2wikimqa", "musique"],
    "Summarization": ["gov_report", "qmsum", "multi_news"],
    "Few-shot": ["trec", "triviaqa", "samsum"],
    "Code": ["lcc", "repobench-p"],
}


def samples(tokenizer, task: str, *, length=None, indices, fmt: PromptFormat = PromptFormat(), data_dir: str):
    """Samples ``indices`` (line numbers) of ``data_dir/{task}.jsonl``; ``length`` is unused (LongBench prompts
    have their own lengths). Indices past the end of the file are skipped."""
    if task not in PROMPTS:
        raise ValueError(f"unknown LongBench task {task!r}; known: {', '.join(PROMPTS)}")
    path = Path(data_dir) / f"{task}.jsonl"
    with open(path) as f:
        lines = f.readlines()
    if task in NO_CHAT:
        fmt = PromptFormat(chat=False)
    for i in indices:
        if i >= len(lines):
            continue
        row = json.loads(lines[i])
        text = PROMPTS[task].format(context=row["context"], input=row["input"])
        yield Sample("longbench", task, i, text, fmt.ids(tokenizer, text), list(row["answers"]), MAX_NEW_TOKENS[task],
                     {"all_classes": row.get("all_classes")})
