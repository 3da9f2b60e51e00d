"""Classic speculative decoding: a smaller model with the target's tokenizer drafts a chain of ``k`` tokens.

The draft model keeps its own KV cache, in sync with the target's accepted prefix. Proposing runs ``k``
draft forwards: the first over ``[pending, root]`` (``pending`` is the last draft token of the previous step
when all ``k`` drafts were accepted, since the draft model never ran on it) or ``[root]`` alone, then one per
draft token but the last. After verification the draft cache is cut back to the tokens the target kept.
Under sampling, drafts are drawn from the draft model's distribution (same temperature/top-k/top-p as the
target), which is returned as ``q`` for lossless rejection sampling.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from jaxspec.cache import KVCache
from jaxspec.drafters import Proposal
from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import forward
from jaxspec.speculative import draw
from jaxspec.tree import chain


@flax.struct.dataclass
class DraftState:
    cache: KVCache
    pending: jax.Array  # [B] token the draft cache still lacks (when has_pending)
    has_pending: jax.Array  # [B] bool


@dataclasses.dataclass(frozen=True)
class DraftModel:
    """Draft-model drafter: a chain of ``k`` tokens. ``cfg`` is bound by ``prepare`` from the draft model."""

    summary: ClassVar[str] = "a smaller model of the same tokenizer drafts a chain of k tokens, its KV cache in sync"
    needs_draft: ClassVar[bool] = True  # does it take a draft model (--draft)?

    k: int = 4
    cfg: ModelConfig | None = None

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    @property
    def tree_size(self) -> int:
        return self.k + 1

    def prepare(self, draft_model):
        if draft_model is None:
            raise ValueError("the draft-model drafter needs draft_model (a jaxspec.Model with the target's tokenizer)")
        return dataclasses.replace(self, cfg=draft_model.config), draft_model.params

    def init(self, dparams, prompt_tokens, prompt_lengths, capacity):
        B, Tp = prompt_tokens.shape
        cache = lax.optimization_barrier(KVCache.create(self.cfg, B, capacity + self.k + 1))  # not a constant
        pos = jnp.where(jnp.arange(Tp)[None, :] < prompt_lengths[:, None], jnp.arange(Tp)[None, :], -1)
        _, cache, _ = forward(dparams, self.cfg, prompt_tokens, pos, cache, last_only=True, empty_cache=True)
        return DraftState(cache, jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool))

    def propose(self, dparams, state: DraftState, hist, hist_len, live, rng, sampling):
        B = hist.shape[0]
        root = jnp.take_along_axis(hist, (hist_len - 1)[:, None], axis=1)[:, 0]
        rpos = hist_len - 1
        hp = state.has_pending[:, None]
        toks = jnp.where(hp, jnp.stack([state.pending, root], 1), jnp.stack([root, root], 1))
        pos = jnp.where(hp, jnp.stack([rpos - 1, rpos], 1), jnp.stack([rpos, jnp.full_like(rpos, -1)], 1))
        logits, cache, _ = forward(dparams, self.cfg, toks, jnp.where(live[:, None], pos, -1), state.cache,
                                   last_only=True)

        def step(carry, i):
            logits, cache = carry
            tok, q = draw(logits, jax.random.fold_in(rng, i), sampling)
            p = jnp.where(live, rpos + 1 + i, -1)[:, None]
            logits, cache, _ = forward(dparams, self.cfg, tok[:, None], p, cache, last_only=True)
            return (logits, cache), (tok, q)

        (logits, cache), (toks, qs) = lax.scan(step, (logits, cache), jnp.arange(self.k - 1))
        last, q_last = draw(logits, jax.random.fold_in(rng, self.k - 1), sampling)
        drafts = jnp.concatenate([toks.T, last[:, None]], axis=1)  # [B, k]
        q = jnp.concatenate([jnp.zeros_like(q_last[:, None]), qs.transpose(1, 0, 2), q_last[:, None]], axis=1)
        tokens = jnp.concatenate([root[:, None], drafts], axis=1)
        tree = chain(tokens, jnp.full((B,), self.k + 1, jnp.int32))
        return Proposal(tree, q), DraftState(cache, state.pending, state.has_pending)

    def update(self, dparams, state: DraftState, proposal: Proposal, base, keep):
        ran = keep > 0
        full = keep == self.k + 1
        length = jnp.where(ran, base + jnp.minimum(keep, self.k), state.cache.length)
        return DraftState(
            state.cache.replace(length=length.astype(jnp.int32)),
            jnp.where(full, proposal.tree.tokens[:, -1], state.pending),
            jnp.where(ran, full, state.has_pending),
        )
