"""``recency``: keep the last ``capacity`` prompt tokens (truncation from the left)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxspec.pc.base import Method


@dataclasses.dataclass(frozen=True)
class Recency(Method):
    """Keep the last ``capacity`` prompt tokens; no draft, no scoring."""

    name = "recency"
    summary = "the last capacity tokens (no scoring)"

    capacity: int = 1024

    def priority(self, score, n):
        return jnp.broadcast_to(jnp.arange(score.shape[1], dtype=jnp.float32)[None], score.shape)
