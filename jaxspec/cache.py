"""Static-capacity KV cache, an explicit input and output of the model's forward.

Layout ``k, v: [layers, batch, kv_heads, capacity, head_dim]`` — head-major so that a (layer, kv head)
is one contiguous ``[capacity, head_dim]`` block: decode reads it linearly, and per-head compression
(SnapKV/AdaKV/SpecKV) selects and gathers along the capacity axis of one block.
``pos: [layers, batch, kv_heads, capacity]`` holds each entry's original RoPE position, ``-1`` for an
empty or evicted slot; it is the validity mask, per layer and per head. ``length: [batch]`` is the
number of slots in use per row (slots ``>= length`` are ignored even if stale). Writes go to
``[length, length + n)`` per row, so rows of a batch advance independently; ``forward`` writes each layer's
entries (``jaxspec.models.transformer.write_layer``) before that layer reads its slots.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


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
