"""What the prompt-compression methods share: the config base classes and the final selection.

A method is a frozen (hashable) dataclass, a static argument of the jitted stages in ``jaxspec.pc.pipeline``.
It turns per-token evidence into a *priority* per prompt position (``priority(score, n)``, traced, static
shapes); the shared ``keep_top`` keeps the ``capacity`` highest-priority positions of each row, ties toward
the lowest position, and returns them in original order. Where the evidence comes from is the method's
``source``:

* ``"attention"``: the draft's attention (``AttentionMethod``: a draft prefill over the prompt plus a short
  greedy lookahead, capturing selected query rows, see ``jaxspec.pc.pipeline.attention_pass``);
* ``"surprisal"``: the draft's next-token surprisal ``-log p(x_j | x_<j)`` of every prompt token;
* ``None``: nothing (recency, random).

A row whose prompt has ``n <= capacity`` tokens is returned unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from jax import lax

from jaxspec.api import InputError


@dataclasses.dataclass(frozen=True)
class Method:
    name: ClassVar[str]
    summary: ClassVar[str]
    source: ClassVar[str | None] = None
    keep_positions: ClassVar[bool] = False  # the target sees the kept tokens at their original positions

    capacity: int = 1024  # max_capacity_prompt: tokens kept

    def __post_init__(self):
        if self.capacity < 1:
            raise InputError(f"{self.name}: capacity must be >= 1, got {self.capacity}")

    @property
    def needs_draft(self) -> bool:
        return self.source is not None

    def params(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, draft_cfg) -> None:
        """Refuse a draft this config cannot run on (called with the draft's ``ModelConfig``)."""

    def priority(self, score, n):
        """``[B, T]`` priorities (higher is kept first) from the evidence ``score [B, T]`` (zeros when
        ``source`` is None) and the prompt lengths ``n [B]``; positions ``>= n`` are ignored."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class WindowMethod(Method):
    """Keeps the last ``window_size`` prompt tokens (where the question usually is) whatever they score."""

    window_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.window_size < 0:
            raise InputError(f"{self.name}: window_size must be >= 0, got {self.window_size}")
        if self.capacity < self.window_size:
            raise InputError(f"{self.name}: capacity ({self.capacity}) must be >= window_size ({self.window_size})")

    def protect(self, priority, n):
        """``priority`` with the window ``[n - window_size, n)`` raised above every other position."""
        j = jnp.arange(priority.shape[1])[None]
        return jnp.where(j >= (n - self.window_size)[:, None], jnp.inf, priority)


def keep_top(priority, n, k: int):
    """The ``k`` (static) highest-priority positions ``< n[b]`` of each row, ties toward the lowest position,
    in ascending order. Returns ``(index [B, k], count [B])``: row ``b`` keeps ``index[b, :count[b]]`` with
    ``count = min(n, k)``; the slots after it are filler (the row's length)."""
    T = priority.shape[1]
    valid = jnp.arange(T)[None] < n[:, None]
    _, order = lax.top_k(jnp.where(valid, priority, -jnp.inf), k)  # equal values: lower index first
    count = jnp.minimum(n, k)
    index = jnp.sort(jnp.where(jnp.arange(k)[None] < count[:, None], order, T), axis=1)
    return jnp.minimum(index, n[:, None]), count


@dataclasses.dataclass(frozen=True)
class AttentionMethod(WindowMethod):
    """Scores from the draft's attention (``jaxspec.pc.pipeline.attention_pass``): the draft prefills the
    prompt capturing the query rows ``rows(n)`` and greedily writes ``lookahead_tokens`` tokens, capturing
    the query of every token it feeds back (so ``lookahead_tokens - 1`` decode queries). Each capture is
    ``[L, B, H, T]`` (``capture()`` says how it is reduced inside the forward) with keys ``>= n`` zeroed;
    ``step_score`` reduces it to ``[B, T]`` and ``combine`` ("max", "sum" or "mean") folds the steps."""

    source = "attention"
    combine: ClassVar[str] = "max"

    lookahead_tokens: int | None = 1

    def __post_init__(self):
        super().__post_init__()
        if self.lookahead_tokens is not None and self.lookahead_tokens < 1:
            raise InputError(f"{self.name}: lookahead_tokens must be >= 1, got {self.lookahead_tokens}")

    @property
    def steps(self) -> int:
        """Draft tokens written (``None``: 20, transformers' default that the paper's SpecKV-PC configs get)."""
        return 20 if self.lookahead_tokens is None else self.lookahead_tokens

    def capture(self) -> tuple[str, str]:
        raise NotImplementedError

    def rows(self, n):
        """Captured prompt query rows ``(index [B, R], weight [B, R])`` (R static)."""
        raise NotImplementedError

    def step_score(self, attn):
        raise NotImplementedError
