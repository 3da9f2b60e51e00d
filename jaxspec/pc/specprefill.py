"""``specprefill``: Speculative Prefill (Liu, Chen, Zhang, ICML 2025, arXiv 2502.02789), the closest prior
work to SpecPC (§4 of ``shared/research/speckv.md``)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxspec.api import InputError
from jaxspec.pc.base import AttentionMethod


@dataclasses.dataclass(frozen=True)
class SpecPrefill(AttentionMethod):
    """The draft prefills the prompt and greedily writes ``lookahead_tokens`` tokens; the queries are the last
    prompt token and every generated token it feeds back. Each query's attention is renormalised over the
    prompt keys (the reference lets look-ahead queries attend to the context only), reduced by max over
    layers and query heads, then averaged over the queries. Scores are averaged over chunks of
    ``chunk_size`` tokens and whole chunks are kept best first (ties to the earlier chunk; the last chunk
    that fits is cut to the budget, keeping its earliest tokens); the last ``window_size`` tokens (default:
    the final one, from which the target predicts) are always kept. The target sees the kept tokens at their
    ORIGINAL positions and decodes from position ``n`` (unlike SpecPC, which re-numbers them).
    The reference's default (``pool_kernel_size=None``) does not smooth, and neither does this."""

    name = "specprefill"
    summary = "draft attention of the last token + lookahead, max over layers/heads, chunk-averaged; original positions"
    keep_positions = True
    combine = "mean"

    capacity: int = 1024
    window_size: int = 1
    lookahead_tokens: int | None = 8
    chunk_size: int = 32

    def __post_init__(self):
        super().__post_init__()
        if self.chunk_size < 1:
            raise InputError(f"specprefill: chunk_size must be >= 1, got {self.chunk_size}")

    def capture(self):
        return "none", "max"  # one query row per capture: keep every query head

    def rows(self, n):
        return (n - 1)[:, None], jnp.ones((n.shape[0], 1), jnp.float32)

    def step_score(self, attn):
        ctx = attn / jnp.maximum(attn.sum(-1, keepdims=True), 1e-30)  # softmax over the prompt keys only
        return ctx.max((0, 2))

    def priority(self, score, n):
        B, T = score.shape
        c = self.chunk_size
        Tc = -(-T // c) * c
        j = jnp.arange(Tc)[None]
        s = jnp.pad(jnp.where(j[:, :T] < n[:, None], score, 0.0), ((0, 0), (0, Tc - T)))
        size = jnp.clip(n[:, None] - (j // c) * c, 1, c)  # tokens of each chunk inside the prompt
        mean = (s.reshape(B, -1, c).sum(-1, keepdims=True) / size.reshape(B, -1, c)[..., :1])
        return self.protect(jnp.broadcast_to(mean, (B, Tc // c, c)).reshape(B, Tc)[:, :T], n)
