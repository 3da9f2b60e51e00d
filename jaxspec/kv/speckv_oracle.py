"""``speckv-oracle``: SpecKV scored with the target's own greedy answer as the lookahead (an upper bound
on what a draft can give; for diagnostics)."""

from __future__ import annotations

import dataclasses

from jaxspec.kv.speckv import SpecKV


@dataclasses.dataclass(frozen=True)
class SpecKVOracle(SpecKV):
    """``SpecKV`` whose lookahead is the target's greedy continuation (no draft; costs a full target
    generation before the compressed one)."""

    name = "speckv-oracle"
    summary = "SpecKV with the target's own greedy answer as lookahead (upper bound, diagnostics)"
    needs_draft = False
