"""``full``: no compression (the reference every method is compared with)."""

from __future__ import annotations

import dataclasses

from jaxspec.kv.base import Method


@dataclasses.dataclass(frozen=True)
class Full(Method):
    """Keep every prompt entry."""

    name = "full"
    summary = "no compression: the whole prompt's KV cache"
