"""``snapkv``: observation-window scoring (Li et al., 2024, arXiv 2404.14469). The base of ``pyramidkv``,
``adakv`` and ``speckv``."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxspec.api import InputError
from jaxspec.kv.base import WindowMethod
from jaxspec.select import POOLS, REDUCTIONS, candidate_scores, select


@dataclasses.dataclass(frozen=True)
class SnapKV(WindowMethod):
    """Score each earlier prompt entry by the attention of the last ``window_size`` prompt queries (fp32
    softmax over all keys, causal inside the window), reduced over the GQA group and the window queries by
    ``reduction_type`` ("mean" ranks like SnapKV's sum), pooled along keys (``pool_type``, odd
    ``kernel_size``); keep the top ``capacity - window_size`` per (layer, kv head) plus the window."""

    name = "snapkv"
    summary = "attention of the last window_size prompt queries, pooled; top capacity - window + window"

    kernel_size: int = 7
    pool_type: str = "max"
    reduction_type: str = "mean"

    def __post_init__(self):
        super().__post_init__()
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise InputError(f"{self.name}: kernel_size must be odd (pooling keeps the length), got "
                             f"{self.kernel_size}")
        if self.pool_type not in POOLS:
            raise InputError(f"{self.name}: pool_type must be one of {POOLS}, got {self.pool_type!r}")
        if self.reduction_type not in REDUCTIONS:
            raise InputError(f"{self.name}: reduction_type must be one of {REDUCTIONS}, got "
                             f"{self.reduction_type!r}")

    def capture(self):
        return self.reduction_type, self.reduction_type

    def query_rows(self, n, look_len, num_look, T):
        """The last ``window_size`` prompt tokens."""
        W = self.window_size
        return n - W, jnp.full_like(n, W), W

    def budgets(self, pooled, start, n):
        """Candidates kept per (layer, row, kv head), broadcastable to ``[L, B, H]``."""
        return jnp.int32(self.budget)

    def keep(self, scores, n, k):
        start, end = self.window(n)
        pooled = candidate_scores(scores, start, self.kernel_size, self.pool_type)
        return select(pooled, start, end, self.budgets(pooled, start, n), k)
