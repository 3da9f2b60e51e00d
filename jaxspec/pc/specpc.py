"""``specpc``: prompt compression from draft attention (Galim et al., arXiv 2506.08373; §2 of
``shared/research/speckv.md``)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxspec.api import InputError
from jaxspec.pc.base import AttentionMethod
from jaxspec.select import query_rows


@dataclasses.dataclass(frozen=True)
class SpecPC(AttentionMethod):
    """The draft prefills the prompt; per layer from ``starting_layer_index``, the attention of the last
    ``window_size`` prompt queries (row ``r`` weighted ``r / (W - 1)``, 0 -> 1, when ``weighted_query``) and
    of the ``lookahead_tokens - 1`` generated tokens it feeds back, against the prompt keys (fp32 softmax over
    every key the query sees), is reduced by ``reduction_type`` over heads and rows, then layers, then steps
    ("mean" is a sum, as in the reference). The scores are pooled (``kernel_size``, zero padding
    ``(k-1)//2`` left and ``k-1-(k-1)//2`` right, so even kernels work); the ``capacity`` best positions are
    seeds, each expanded in score order to its ``neighbor_tokens`` neighbourhood (offsets by distance, the
    negative one first); the window comes first; the first ``capacity`` distinct positions are kept, in
    original order. The target then sees them at positions ``0..capacity-1``.

    The reference's order-preserving ``unique`` becomes a first-occurrence rank per position (a scatter-min),
    so shapes are static; ties in the pooled scores go to the lowest position. Unlike the reference, the
    captured probabilities stay fp32 (it casts them to bf16), and the draft decodes with no repetition
    penalty (pitfall P9). Defaults are the paper's Qwen 0.5B -> 14B settings; its Llama pair uses 32/32.
    """

    name = "specpc"
    summary = "draft attention of the last window queries (+ lookahead), pooled; neighbourhoods of the peaks"

    capacity: int = 1024
    window_size: int = 64
    kernel_size: int = 64
    neighbor_tokens: int | None = None  # None: kernel_size
    pool_type: str = "max"
    reduction_type: str = "max"
    lookahead_tokens: int | None = 1
    starting_layer_index: int = 8
    weighted_query: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.window_size < 1:
            raise InputError(f"specpc: window_size must be >= 1 (its queries score the prompt), got {self.window_size}")
        if self.kernel_size < 1:
            raise InputError(f"specpc: kernel_size must be >= 1, got {self.kernel_size}")
        if self.neighbor_tokens is not None and self.neighbor_tokens < 0:
            raise InputError(f"specpc: neighbor_tokens must be >= 0, got {self.neighbor_tokens}")
        if self.pool_type not in ("max", "mean", "avg"):
            raise InputError(f"specpc: pool_type must be 'max', 'mean' or 'avg', got {self.pool_type!r}")
        if self.reduction_type not in ("max", "mean", "sum"):
            raise InputError(f"specpc: reduction_type must be 'max', 'mean' or 'sum', got {self.reduction_type!r}")
        if self.starting_layer_index < 0:
            raise InputError(f"specpc: starting_layer_index must be >= 0, got {self.starting_layer_index}")

    def check(self, draft_cfg):
        if self.starting_layer_index >= draft_cfg.num_layers:
            raise InputError(f"specpc: starting_layer_index ({self.starting_layer_index}) must be below the "
                             f"draft's number of layers ({draft_cfg.num_layers})")

    @property
    def reduce(self) -> str:
        return "max" if self.reduction_type == "max" else "sum"

    @property
    def combine(self) -> str:
        return self.reduce

    def capture(self):
        return self.reduce, self.reduce

    def rows(self, n):
        W = self.window_size
        index, weight = query_rows(n - W, jnp.full_like(n, W), W, "max")
        if self.weighted_query:
            weight = weight * jnp.linspace(0.0, 1.0, W, dtype=jnp.float32)[None]
        return index, weight

    def step_score(self, attn):
        layers = attn[self.starting_layer_index:]
        return layers.max((0, 2)) if self.reduce == "max" else layers.sum((0, 2))

    def offsets(self) -> np.ndarray:
        """Neighbourhood offsets ordered by distance (0, -1, +1, -2, +2, ...)."""
        N = self.kernel_size if self.neighbor_tokens is None else self.neighbor_tokens
        if N == 0:
            return np.zeros(1, np.int32)
        d = np.arange(-((N - 1) // 2), N - 1 - (N - 1) // 2 + 1)
        return d[np.argsort(np.abs(d), kind="stable")].astype(np.int32)

    def pool(self, s):
        k = self.kernel_size
        pad = ((0, 0), ((k - 1) // 2, k - 1 - (k - 1) // 2))
        if self.pool_type == "max":  # scores are >= 0: the -inf padding acts as the reference's zeros
            return lax.reduce_window(s, -jnp.inf, lax.max, (1, k), (1, 1), pad)
        return lax.reduce_window(s, 0.0, lax.add, (1, k), (1, 1), pad) / k

    def priority(self, score, n):
        B, T = score.shape
        j = jnp.arange(T)[None]
        pooled = self.pool(jnp.where(j < n[:, None], score, 0.0))
        _, seeds = lax.top_k(jnp.where(j < n[:, None], pooled, -jnp.inf), min(self.capacity, T))
        W = self.window_size
        order = jnp.concatenate([  # the reference's list before its order-preserving unique: window, then
            n[:, None] - W + jnp.arange(W)[None],  # every seed's neighbourhood in seed (score) order
            (seeds[:, :, None] + jnp.asarray(self.offsets())[None, None]).reshape(B, -1),
        ], axis=1)
        order = jnp.clip(order, 0, jnp.maximum(n - 1, 0)[:, None])
        first = jax.vmap(lambda o: jnp.full((T,), order.shape[1], jnp.int32).at[o].min(jnp.arange(o.shape[0])))(order)
        return -first.astype(jnp.float32)  # earlier first occurrence = higher priority
