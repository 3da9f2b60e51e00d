"""Evaluation data: RULER-style synthetic tasks, LongBench v1 and HumanEval, as token-id prompts.

Every loader yields ``Sample``s whose ``ids`` are the prompt exactly as the target sees it (chat template and
answer prefix applied, tokenized with the target's tokenizer), so the runner calls ``jaxspec.generate`` with
token ids and no further formatting. ``DATASETS`` maps a dataset name to its module; each module has
``TASKS`` (task name -> parameters), ``CATEGORIES`` (category -> tasks) and ``samples(tokenizer, task, *,
length, indices, fmt, **options)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Sample:
    """One prompt: its task, index within the task, ``text`` (the task text and answer prefix, before any chat
    template), token ids, reference answers, generation length and task-specific extras (``meta``: e.g.
    LongBench's ``all_classes``, RULER's needle depths)."""

    dataset: str
    task: str
    index: int
    text: str
    ids: list[int]
    answers: list[str]
    max_new_tokens: int
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a task text becomes token ids. ``chat``: the tokenizer's chat template with one user turn (after a
    ``system`` turn when given; Qwen's template adds its default system prompt by itself), the answer prefix
    appended after the generation prompt, tokenized without special tokens. Otherwise the raw text plus the
    answer prefix, tokenized with the tokenizer's default special tokens (BOS where the model uses one)."""

    chat: bool = True
    system: str | None = None

    def ids(self, tokenizer, text: str, answer_prefix: str = "") -> list[int]:
        if not self.chat:
            return tokenizer.encode(text + answer_prefix)
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": text}]
        return tokenizer.encode(tokenizer.apply_chat_template(msgs) + answer_prefix, add_special_tokens=False)


def dataset_module(name: str):
    """The module of dataset ``name`` (``ruler``, ``longbench`` or ``humaneval``)."""
    from experiments.data import humaneval, longbench, ruler

    table = {"ruler": ruler, "longbench": longbench, "humaneval": humaneval}
    if name not in table:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(table)}")
    return table[name]


def category(dataset: str, task: str) -> str | None:
    """The category of ``task`` in ``dataset`` (None when it has none)."""
    for cat, tasks in dataset_module(dataset).CATEGORIES.items():
        if task in tasks:
            return cat
    return None
