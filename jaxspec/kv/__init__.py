"""KV-cache compression methods: one small file each, registered here by name.

Every method is a frozen config dataclass (field names follow the papers' configs: ``capacity`` is
``max_capacity_prompt``). Use them through ``jaxspec.generate(model, prompts, kv=SpecKV(capacity=256),
draft=draft)``, or ``compress`` a prompt batch once and ``decode`` it as often as needed. To add a method:
a file with its dataclass (a ``Method``/``WindowMethod`` subclass), an entry in ``METHODS``, and a case in
``tests/test_kv.py``.
"""

from __future__ import annotations

import dataclasses

from jaxspec.api import InputError
from jaxspec.kv.adakv import AdaKV
from jaxspec.kv.base import Method, WindowMethod
from jaxspec.kv.full import Full
from jaxspec.kv.h2o import H2O
from jaxspec.kv.pipeline import Compressed, accounting, compress, decode
from jaxspec.kv.pyramidkv import PyramidKV
from jaxspec.kv.snapkv import SnapKV
from jaxspec.kv.speckv import SpecKV
from jaxspec.kv.speckv_oracle import SpecKVOracle
from jaxspec.kv.streamingllm import StreamingLLM

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (Full, StreamingLLM, H2O, SnapKV, PyramidKV, AdaKV, SpecKV, SpecKVOracle)
}


def make_method(kv: str | Method, **params) -> Method:
    """A method config from a registry name (plus field overrides), or the config itself."""
    if isinstance(kv, Method):
        if params:
            return dataclasses.replace(kv, **params)
        return kv
    if kv not in METHODS:
        raise InputError(f"unknown kv method {kv!r}; known: {', '.join(METHODS)}")
    cls = METHODS[kv]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise InputError(f"kv method {kv!r} has no parameter {', '.join(unknown)}; it takes {', '.join(sorted(fields))}")
    return cls(**params)


def describe() -> list[dict]:
    """Every method: name, summary, whether it needs a draft, and its parameters with defaults."""
    return [{"name": name, "summary": cls.summary, "needs_draft": cls.needs_draft,
             "params": {f.name: f.default for f in dataclasses.fields(cls)}} for name, cls in METHODS.items()]


__all__ = ["METHODS", "AdaKV", "Compressed", "Full", "H2O", "Method", "PyramidKV", "SnapKV", "SpecKV",
           "SpecKVOracle", "StreamingLLM", "WindowMethod", "accounting", "compress", "decode", "describe",
           "make_method"]
