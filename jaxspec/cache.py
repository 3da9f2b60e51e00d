"""Static-capacity KV cache, an explicit input and output of the model's forward.

Layout ``k, v: [layers, batch, kv_heads, capacity, head_dim]`` — head-major so that a (layer, kv head)
is one contiguous ``[capacity, head_dim]`` block: decode reads it linearly, and per-head compression
(SnapKV/AdaKV/SpecKV) selects and gathers along the capacity axis of one block.
``pos: [layers, batch, kv_heads, capacity]`` holds each entry's original RoPE position, ``-1`` for an
empty or evicted slot; it is the validity mask, per layer and per head. ``length: [batch]`` is the
number of slots in use per row (slots ``>= length`` are ignored even if stale). Writes go to
``[length, length + n)`` per row, so rows of a batch advance independently.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax


@flax.struct.dataclass
class KVCache:
    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array

    @classmethod
    def create(cls, cfg, batch: int, capacity: int, dtype=None) -> "KVCache":
        dtype = jnp.dtype(dtype or cfg.dtype)
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            pos=jnp.full(shape[:-1], -1, jnp.int32),
            length=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return sum(int(x.size) * x.dtype.itemsize for x in (self.k, self.v, self.pos, self.length))

    def append(self, new_k, new_v, positions) -> "KVCache":
        """Write new entries ``[L, B, Hk, T, hd]`` at each row's length; padding (pos -1) is not written.

        Valid tokens must be a prefix of the T axis. The caller guarantees ``length + valid <= capacity``
        (generation checks it and reports ``cache_full`` rather than writing past the end).
        """
        valid = positions >= 0  # [B, T]
        T = positions.shape[1]

        def row(k, v, p, nk, nv, pos_row, ok, start):
            # k/v [L, Hk, S, hd]; p [L, Hk, S]; nk/nv [L, Hk, T, hd]; pos_row/ok [T]
            L, Hk = p.shape[:2]
            old_k = lax.dynamic_slice(k, (0, 0, start, 0), nk.shape)
            old_v = lax.dynamic_slice(v, (0, 0, start, 0), nv.shape)
            old_p = lax.dynamic_slice(p, (0, 0, start), (L, Hk, T))
            okk = ok[None, None, :, None]
            k = lax.dynamic_update_slice(k, jnp.where(okk, nk.astype(k.dtype), old_k), (0, 0, start, 0))
            v = lax.dynamic_update_slice(v, jnp.where(okk, nv.astype(v.dtype), old_v), (0, 0, start, 0))
            p = lax.dynamic_update_slice(p, jnp.where(ok[None, None], pos_row[None, None], old_p), (0, 0, start))
            return k, v, p

        k, v, p = jax.vmap(row, in_axes=(1, 1, 1, 1, 1, 0, 0, 0), out_axes=(1, 1, 1))(
            self.k, self.v, self.pos, new_k, new_v, positions, valid, self.length
        )
        return KVCache(k=k, v=v, pos=p, length=self.length + valid.sum(axis=1).astype(jnp.int32))
