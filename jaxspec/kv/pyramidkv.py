"""``pyramidkv``: SnapKV scores with a budget that shrinks linearly with depth (Cai et al., 2024,
arXiv 2406.02069)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxspec.api import InputError
from jaxspec.kv.snapkv import SnapKV


def pyramid_budgets(n, num_layers: int, budget: int, window: int, beta: int):
    """Candidates kept per layer and row, ``[L, B]`` int32, for prompt lengths ``n [B]``.

    ``B = budget`` is the mean; the schedule falls linearly from ``max = 2B - B // beta`` (layer 0) to
    ``min = B // beta`` (last layer); when ``max >= n - window`` it becomes ``max = n - window``,
    ``min = 2B - max`` (PyramidKV/KVCache-Factory). The real-valued schedule is rounded by its cumulative
    sum, so the layers' budgets sum to exactly ``L * B`` (KVCache-Factory's floored step overshoots it).
    """
    L = num_layers
    lo = budget // beta
    hi = jnp.full_like(n, 2 * budget - lo)
    cap = hi >= n - window
    hi = jnp.where(cap, n - window, hi)
    lo = jnp.where(cap, 2 * budget - hi, lo)
    if L == 1:
        return jnp.full((1, n.shape[0]), budget, jnp.int32)
    # S(l) = sum_{i<l} (hi - i (hi - lo) / (L-1)), scaled by 2 (L-1) to stay in integers
    l = jnp.arange(L + 1)[:, None]
    scaled = 2 * (L - 1) * l * hi[None] - (hi - lo)[None] * l * (l - 1)
    rounded = (scaled + (L - 1)) // (2 * (L - 1))  # round half up
    return (rounded[1:] - rounded[:-1]).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    """SnapKV with per-layer budgets (``pyramid_budgets``), masks inside one static capacity of
    ``window_size + 2B - B // beta`` slots (unused slots hold no entry)."""

    name = "pyramidkv"
    summary = "SnapKV scores; per-layer budgets decreasing linearly with depth (mean capacity - window)"

    beta: int = 20

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 1:
            raise InputError(f"pyramidkv: beta must be >= 1, got {self.beta}")

    def slots(self, T, num_kv_heads):
        return min(self.window_size + 2 * self.budget - self.budget // self.beta, T)

    def budgets(self, pooled, start, n):
        return pyramid_budgets(n, pooled.shape[0], self.budget, self.window_size, self.beta)[..., None]
