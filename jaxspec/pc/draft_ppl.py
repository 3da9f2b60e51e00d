"""``draft-ppl``: drop the tokens the draft finds most predictable (LLMLingua-1 style, Jiang et al., 2023,
arXiv 2310.05736, token granularity)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxspec.pc.base import WindowMethod


@dataclasses.dataclass(frozen=True)
class DraftPPL(WindowMethod):
    """Score each prompt token by the draft's surprisal ``-log p(x_j | x_<j)`` and keep the ``capacity``
    most surprising ones (ties to the lowest position), the first token (it has no context) and the last
    ``window_size`` (the question), in original order; the target sees them at ``0..capacity-1``.
    Token granularity only: LLMLingua's budget controller, iterative re-scoring and sentence-level
    filtering are not implemented."""

    name = "draft-ppl"
    summary = "keep the tokens the draft finds least predictable (surprisal), plus the window"
    source = "surprisal"

    capacity: int = 1024
    window_size: int = 64

    def priority(self, score, n):
        first = jnp.arange(score.shape[1])[None] == 0
        return self.protect(jnp.where(first, jnp.inf, score), n)
