"""``streamingllm``: attention sinks + recent tokens (Xiao et al., 2023, arXiv 2309.17453)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxspec.api import InputError
from jaxspec.kv.base import Method
from jaxspec.select import select


@dataclasses.dataclass(frozen=True)
class StreamingLLM(Method):
    """Keep the first ``sink_size`` prompt entries and the last ``capacity - sink_size``; no scoring.
    (KVCache-Factory's prefill variant is ``sink_size = capacity - window_size``.)"""

    name = "streamingllm"
    summary = "first sink_size tokens + the most recent capacity - sink_size (no scoring)"

    capacity: int = 1024
    sink_size: int = 4

    def __post_init__(self):
        if not 0 <= self.sink_size < self.capacity:
            raise InputError(f"streamingllm: sink_size must be in [0, capacity), got sink_size={self.sink_size}, "
                             f"capacity={self.capacity}")

    def slots(self, T, num_kv_heads):
        return min(self.capacity, T)

    def keep(self, scores, n, k):
        start = jnp.where(n <= self.capacity, 0, n - (self.capacity - self.sink_size))
        earliest_first = -jnp.broadcast_to(jnp.arange(scores.shape[-1], dtype=jnp.float32), scores.shape)
        return select(earliest_first, start, n, jnp.int32(self.sink_size), k)
