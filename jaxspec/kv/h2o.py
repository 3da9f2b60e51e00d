"""``h2o``: heavy hitters at prefill (Zhang et al., 2023, arXiv 2306.14048), KVCache-Factory's variant."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxspec.kv.base import WindowMethod
from jaxspec.select import select


@dataclasses.dataclass(frozen=True)
class H2O(WindowMethod):
    """Score key ``j`` by the attention it receives from every prompt query (column sums of the causal
    attention matrix), averaged over the GQA group; keep the top ``capacity - window_size`` plus the last
    ``window_size`` entries. No pooling; eviction happens at prefill only. Capturing every query row costs
    an extra ``[T, T]`` probability pass per layer: fine for a baseline, not for very long prompts."""

    name = "h2o"
    summary = "column sums of the prompt's attention (heavy hitters) + recent window"
    prefills_alone = True

    def capture(self):
        return "mean", "sum"

    def query_rows(self, n, look_len, num_look, T):
        return jnp.zeros_like(n), n, T

    def keep(self, scores, n, k):
        start, end = self.window(n)
        return select(scores, start, end, jnp.int32(self.budget), k)
