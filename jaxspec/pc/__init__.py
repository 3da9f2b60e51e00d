"""Prompt-compression methods: one small file each, registered here by name.

Every method is a frozen config dataclass (``capacity`` is the paper's ``max_capacity_prompt``; the other
field names follow the papers' configs). Use them through ``jaxspec.generate(model, prompts,
pc=SpecPC(capacity=1024), draft=draft)`` (combinable with ``kv=``: SpecPC + SpecKV is SpecKV-PC, reusing
the draft's lookahead), or ``compress`` a prompt batch once. To add a method: a file with its dataclass (a
``Method`` subclass with a ``priority``), an entry in ``METHODS``, and a case in ``tests/test_pc.py``.
"""

from __future__ import annotations

import dataclasses

from jaxspec.api import InputError
from jaxspec.pc.base import AttentionMethod, Method, WindowMethod, keep_top
from jaxspec.pc.draft_ppl import DraftPPL
from jaxspec.pc.pipeline import Compressed, accounting, compress
from jaxspec.pc.rand import Random
from jaxspec.pc.recency import Recency
from jaxspec.pc.specpc import SpecPC
from jaxspec.pc.specprefill import SpecPrefill

METHODS: dict[str, type[Method]] = {m.name: m for m in (SpecPC, SpecPrefill, DraftPPL, Recency, Random)}


def make_method(pc: str | Method, **params) -> Method:
    """A method config from a registry name (plus field overrides), or the config itself."""
    if isinstance(pc, Method):
        return dataclasses.replace(pc, **params) if params else pc
    if pc not in METHODS:
        raise InputError(f"unknown pc method {pc!r}; known: {', '.join(METHODS)}")
    cls = METHODS[pc]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise InputError(f"pc method {pc!r} has no parameter {', '.join(unknown)}; it takes {', '.join(sorted(fields))}")
    return cls(**params)


def describe() -> list[dict]:
    """Every method: name, summary, whether it needs a draft, and its parameters with defaults."""
    return [{"name": name, "summary": cls.summary, "needs_draft": cls.source is not None,
             "params": {f.name: f.default for f in dataclasses.fields(cls)}} for name, cls in METHODS.items()]


__all__ = ["METHODS", "AttentionMethod", "Compressed", "DraftPPL", "Method", "Random", "Recency", "SpecPC",
           "SpecPrefill", "WindowMethod", "accounting", "compress", "describe", "keep_top", "make_method"]
