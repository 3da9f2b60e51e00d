"""What the KV-compression methods share: the config base classes.

A method is a frozen (hashable) dataclass, a static argument of the jitted stages in
``jaxspec.kv.pipeline``. It says

* ``capture()``: how the target prefill's attention is captured — ``(group, queries)`` reductions
  (see ``AttnCapture``), or ``None`` when the method needs no attention;
* ``query_rows(n, look_len, num_look, T)``: which query rows are captured, as
  ``(start [B], count [B], num)`` for ``jaxspec.select.query_rows``;
* ``slots(T, num_kv_heads)``: the static capacity of the compressed prompt cache;
* ``keep(scores, n, k)``: the traced selection, ``(index, keep)`` as ``jaxspec.select.select`` returns;
* ``sparse_prefill(n, look_len, T)``: ``None`` for a dense prefill, or the vertical-slash pattern with
  its per-row switch (SpecKV; ``jaxspec.models.sparse``).

A row whose prompt has ``n <= capacity`` tokens is never compressed: all its entries are protected.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jaxspec.api import InputError


@dataclasses.dataclass(frozen=True)
class Method:
    name: ClassVar[str]
    summary: ClassVar[str]
    needs_draft: ClassVar[bool] = False  # the lookahead comes from a draft model
    lookahead: ClassVar[bool] = False  # prefill prompt ⊕ lookahead; drop the final prompt entry, re-feed it
    # its scores need a capturing prefill of its own (every prompt row: H2O), never ``score_suffix``; that dense
    # prefill of the prompt alone is also the plain one, so a batch's runner does such methods first
    prefills_alone: ClassVar[bool] = False

    def params(self) -> dict:
        return dataclasses.asdict(self)

    def capture(self) -> tuple[str, str] | None:
        return None

    def slots(self, T: int, num_kv_heads: int) -> int:
        return T

    def sparse_prefill(self, n, look_len, T: int):
        """``(VerticalSlash, rows [B], start [B])`` for a sparse prefill of a ``T``-token buffer, or ``None``."""
        return None


@dataclasses.dataclass(frozen=True)
class WindowMethod(Method):
    """Keep the last ``window_size`` prompt entries plus ``capacity - window_size`` earlier ones chosen by
    the subclass's ``keep``."""

    capacity: int = 1024
    window_size: int = 32

    def __post_init__(self):
        if self.window_size < 0:
            raise InputError(f"{self.name}: window_size must be >= 0, got {self.window_size}")
        if self.capacity <= self.window_size:
            raise InputError(f"{self.name}: capacity ({self.capacity}) must be larger than window_size "
                             f"({self.window_size})")

    @property
    def budget(self) -> int:
        """Selected (non-window) entries per layer and kv head on average."""
        return self.capacity - self.window_size

    def slots(self, T, num_kv_heads):
        return min(self.capacity, T)

    def window(self, n):
        """``(start, end)`` per row: candidates are ``[0, start)``; ``[start, end)`` is always kept."""
        return jnp.where(n <= self.capacity, 0, n - self.window_size), n
