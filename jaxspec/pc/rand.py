"""``random``: keep a seeded uniform sample of the prompt tokens (a floor for the other methods)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxspec.pc.base import WindowMethod


@dataclasses.dataclass(frozen=True)
class Random(WindowMethod):
    """Keep the last ``window_size`` tokens and ``capacity - window_size`` others drawn uniformly without
    replacement, in original order. Position ``j`` draws ``uniform(fold_in(PRNGKey(seed), j))``, so a row's
    choice depends on its length and ``seed`` only (not on its batch or its padding)."""

    name = "random"
    summary = "seeded uniform sample, plus the window"

    capacity: int = 1024
    window_size: int = 64
    seed: int = 0

    def priority(self, score, n):
        key = jax.random.PRNGKey(self.seed)
        u = jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(key, j)))(jnp.arange(score.shape[1]))
        return self.protect(jnp.broadcast_to(u[None], score.shape), n)
