"""Prompt lookup (n-gram) drafter: copy what followed an earlier occurrence of the context's last n tokens.

Vectorised, static-shape port of vLLM's GPU n-gram proposer: for each n in ``[min_n, max_n]`` compare every
window of the history (prompt + output) with the trailing n-gram, take the earliest match, and prefer the
longest n that matched. The ``k`` tokens that followed the match (as many as the history has) form a chain.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from jaxspec.drafters import Proposal
from jaxspec.tree import chain


def ngram_match(hist, hist_len, k: int, min_n: int, max_n: int):
    """Drafts ``[B, k]`` (0 where invalid) and their count ``[B]`` for histories ``hist [B, H]`` of ``hist_len``.

    A match of the trailing n-gram starts at i < hist_len - n (it is not the suffix itself and at least one
    token follows it); the drafts are ``hist[i + n : min(i + n + k, hist_len)]`` for the earliest such i of
    the longest matching n. No match: zero drafts.
    """
    B, H = hist.shape
    idx = jnp.arange(H)
    padded = jnp.concatenate([hist, jnp.full((B, max_n), -1, hist.dtype)], axis=1)
    start = jnp.full((B,), -1, jnp.int32)
    for n in range(min_n, max_n + 1):
        suffix = jnp.take_along_axis(hist, jnp.maximum(hist_len[:, None] - n + jnp.arange(n), 0), axis=1)
        eq = idx[None, :] < (hist_len - n)[:, None]
        for j in range(n):
            eq &= padded[:, j:j + H] == suffix[:, j:j + 1]
        found = eq.any(axis=1)
        start = jnp.where(found, jnp.argmax(eq, axis=1) + n, start).astype(jnp.int32)
    src = start[:, None] + jnp.arange(k)
    ok = (start[:, None] >= 0) & (src < hist_len[:, None])
    drafts = jnp.where(ok, jnp.take_along_axis(hist, jnp.clip(src, 0, H - 1), axis=1), 0)
    return drafts.astype(jnp.int32), ok.sum(axis=1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class NGram:
    """Prompt-lookup drafter: a chain of up to ``k`` tokens, matching n-grams of ``min_n..max_n`` tokens."""

    summary: ClassVar[str] = "prompt lookup: the longest n-gram match in prompt + output proposes a chain of k"
    needs_draft: ClassVar[bool] = False  # does it take a draft model (--draft)?

    k: int = 5
    max_n: int = 3
    min_n: int = 1

    def __post_init__(self):
        if not (self.k >= 1 and 1 <= self.min_n <= self.max_n):
            raise ValueError(f"need k >= 1 and 1 <= min_n <= max_n, got {self}")

    @property
    def tree_size(self) -> int:
        return self.k + 1

    def prepare(self, draft_model):
        return self, None

    def init(self, dparams, prompt_tokens, prompt_lengths, capacity):
        return None

    def propose(self, dparams, state, hist, hist_len, live, rng, sampling):
        drafts, n = ngram_match(hist, hist_len, self.k, self.min_n, self.max_n)
        tokens = jnp.concatenate([jnp.zeros_like(drafts[:, :1]), drafts], axis=1)
        return Proposal(chain(tokens, n + 1)), state

    def update(self, dparams, state, proposal, base, keep):
        return state
