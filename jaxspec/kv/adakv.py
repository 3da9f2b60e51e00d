"""``adakv``: head-adaptive budgets on SnapKV scores (Ada-SnapKV; Feng et al., 2024, arXiv 2407.11550)."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from jaxspec.api import InputError
from jaxspec.kv.snapkv import SnapKV


def adaptive_budgets(pooled, start, budget: int, floor_alpha: float):
    """Per-head budgets ``[L, B, H]`` from pooled candidate scores ``[L, B, H, N]`` (candidates ``[0, start)``).

    In each (layer, row) the top ``H * budget`` candidates of all heads together are taken; head ``h`` wins
    ``c_h`` of them, and gets ``round((1 - alpha) c_h + floor(alpha * budget))`` (AdaKV's floor; round half
    to even, as ``torch.round``). Equal scores go to the lower head, then the lower position.
    """
    L, B, H, N = pooled.shape
    cand = jnp.arange(N)[None, None, None, :] < start[None, :, None, None]
    flat = jnp.where(cand, pooled, -jnp.inf).reshape(L, B, H * N)
    vals, order = lax.top_k(flat, min(H * budget, H * N))
    wins = jnp.sum(((order // N)[..., None] == jnp.arange(H)) & (vals > -jnp.inf)[..., None], axis=2)
    return jnp.round(wins * (1 - floor_alpha) + int(budget * floor_alpha)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class AdaKV(SnapKV):
    """SnapKV scores (mean over the window and the GQA group, pooled), budgets reallocated across the kv
    heads of a layer (``adaptive_budgets``), as masks inside one static capacity."""

    name = "adakv"
    summary = "SnapKV scores; head-adaptive budgets from a joint top-k over heads, with an alpha floor"

    floor_alpha: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.floor_alpha <= 1.0:
            raise InputError(f"adakv: floor_alpha must be in [0, 1], got {self.floor_alpha}")

    def slots(self, T, num_kv_heads):
        most = math.ceil((1 - self.floor_alpha) * num_kv_heads * self.budget) + int(self.budget * self.floor_alpha)
        return min(self.window_size + most, T)

    def budgets(self, pooled, start, n):
        return adaptive_budgets(pooled, start, self.budget, self.floor_alpha)
