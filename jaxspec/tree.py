"""Fixed-size token trees for speculative verification: buffers, tree attention, acceptance, KV compaction.

A tree is three ``[B, T]`` arrays with ``T`` static: ``tokens``, ``parent`` (``-1`` for the root) and
``valid``. Node 0 is the root — the last emitted token, not yet in the KV cache — and every other node is a
draft token whose parent has a *lower* index (topological order). Valid nodes form a prefix of the ``T``
axis, so the model's ``forward`` writes them to the cache slots ``[length, length + n_valid)`` in node
order: node ``i`` lands in slot ``length + i``. A chain (one path) is the tree with ``parent[i] = i - 1``.

One target forward verifies the whole tree: node ``i`` attends to the cache and to its ancestors and
itself (``ancestors``), at position ``base + depth[i]``. Acceptance keeps the root plus one root-to-node
path; ``compact`` then moves that path's KV entries to contiguous slots and invalidates the rest, which
leaves exactly the cache that plain one-token-at-a-time decoding would have built.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from jaxspec.cache import KVCache
from jaxspec.models.transformer import write_layer


@flax.struct.dataclass
class Tree:
    tokens: jax.Array  # [B, T] int32, node 0 = root
    parent: jax.Array  # [B, T] int32, -1 for the root, parent[i] < i otherwise
    valid: jax.Array  # [B, T] bool, a prefix of the T axis

    @property
    def size(self) -> int:
        return self.tokens.shape[1]


def chain(tokens, num_valid) -> Tree:
    """The one-path tree ``tokens[:, 0] -> tokens[:, 1] -> ...`` with ``num_valid [B]`` nodes (root included)."""
    B, T = tokens.shape
    idx = jnp.arange(T, dtype=jnp.int32)
    return Tree(tokens.astype(jnp.int32), jnp.broadcast_to(idx - 1, (B, T)), idx[None, :] < num_valid[:, None])


def ancestors(tree: Tree):
    """``anc [B, T, T]`` bool: ``anc[b, i, j]`` iff node j is on the root-to-i path (i included), both valid.

    This is the tree attention mask among the new tokens (query i, key j). Built by pointer doubling:
    ``ceil(log2 T)`` boolean matrix products of the parent relation.
    """
    B, T = tree.parent.shape
    eye = jnp.eye(T, dtype=bool)[None]
    anc = eye | (tree.parent[:, :, None] == jnp.arange(T)[None, None, :])
    for _ in range(max(1, math.ceil(math.log2(T)))):
        a = anc.astype(jnp.int32)
        anc = anc | (jnp.einsum("bij,bjk->bik", a, a) > 0)
    return anc & tree.valid[:, :, None] & tree.valid[:, None, :]


def depths(anc):
    """Depth of every node (root 0) from the ancestor matrix; -1 for invalid nodes."""
    return anc.sum(axis=-1).astype(jnp.int32) - 1


def positions(tree: Tree, base, depth):
    """RoPE positions ``base[b] + depth`` of the valid nodes, ``-1`` (padding) for the others."""
    return jnp.where(tree.valid, base[:, None] + depth, -1).astype(jnp.int32)


def path_to(anc, depth, node):
    """``[B, T]``: entry d is the node at depth d on the root-to-``node[b]`` path, -1 past ``depth[node]``."""
    row = jnp.take_along_axis(anc, node[:, None, None], axis=1)[:, 0]  # [B, T] nodes on the path
    T = anc.shape[-1]
    on_level = row[:, None, :] & (depth[:, None, :] == jnp.arange(T)[None, :, None])  # [B, d, j]
    return jnp.where(on_level.any(-1), jnp.argmax(on_level, axis=-1), -1).astype(jnp.int32)


def retrieve_paths(anc, depth):
    """``[B, T, T]``: the root-to-node path of every node (the REST/Medusa retrieve matrix, one row per node)."""
    T = anc.shape[-1]
    nodes = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), anc.shape[:2])
    return jax.vmap(lambda n: path_to(anc, depth, n), in_axes=1, out_axes=1)(nodes)


def greedy_accept(tree: Tree, anc, depth, logits):
    """Longest accepted path under greedy decoding. ``logits [B, T, V]`` are the target's at every node.

    A draft node matches when its token equals the target's argmax at its parent; a node is accepted when
    it and all its ancestors match. Returns the deepest accepted node per row (the first one on ties; the
    root when nothing matches). Its depth is the number of accepted draft tokens.
    """
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    pred_at_parent = jnp.take_along_axis(pred, jnp.maximum(tree.parent, 0), axis=1)
    match = tree.valid & ((tree.parent < 0) | (tree.tokens == pred_at_parent))
    accepted = tree.valid & jnp.all(match[:, None, :] | ~anc, axis=-1)
    return jnp.argmax(jnp.where(accepted, depth, -1), axis=-1).astype(jnp.int32)


def sample_accept(tree: Tree, p, q, u):
    """Lossless speculative sampling down the tree (sequential rejection sampling).

    ``p [B, T, V]``: the target's sampling distribution at every node. ``q [B, T, V]`` or None: the
    distribution node i's token was drawn from (None: drafts are deterministic, i.e. one-hot). ``u [B, T]``
    uniforms. Nodes are visited in index order; a node whose parent is the current node is accepted with
    probability ``min(1, r(x) / q(x))`` where r is the current residual (initially p at the current node);
    on acceptance it becomes the current node, on rejection ``r <- normalise(max(r - q, 0))``. This samples
    the target distribution exactly when every node's children are deterministic drafts (each rejection
    removes one token from the residual; a repeated token has no mass left and is rejected) or i.i.d. draws
    from one q (SpecInfer's multi-draft rule); a chain is the one-child case, i.e. standard speculative
    sampling.
    Returns ``(node, residual)``: the last accepted node and the distribution to draw the bonus token from.
    """
    B, T, V = p.shape

    def step(j, carry):
        cur, res = carry
        x = tree.tokens[:, j]
        qj = jax.nn.one_hot(x, V, dtype=p.dtype) if q is None else q[:, j]
        rx = jnp.take_along_axis(res, x[:, None], axis=1)[:, 0]
        qx = jnp.take_along_axis(qj, x[:, None], axis=1)[:, 0]
        cand = tree.valid[:, j] & (tree.parent[:, j] == cur)
        acc = cand & (u[:, j] * qx < rx)
        rest = jnp.maximum(res - qj, 0.0)
        total = rest.sum(-1, keepdims=True)
        rest = jnp.where(total > 0, rest / jnp.maximum(total, 1e-30), res)
        res = jnp.where(acc[:, None], p[:, j], jnp.where(cand[:, None], rest, res))
        return jnp.where(acc, j, cur), res

    return lax.fori_loop(1, T, step, (jnp.zeros((B,), jnp.int32), p[:, 0]))


def compact(cache: KVCache, base, path, keep) -> KVCache:
    """Keep the first ``keep[b]`` nodes of ``path [B, T]`` (node ids, root first) in slots ``[base, base+keep)``.

    The tree's nodes sit in slots ``base + node``; path node d moves to slot ``base + d``, every other slot
    of the window ``[base, base + T)`` is invalidated (pos -1), and the length becomes ``base + keep``.
    ``keep = 0`` leaves a row as it was before the tree forward. The window must fit in the buffer.
    """
    B, T = path.shape
    idx = jnp.arange(T)
    kept = idx < keep[:, None]
    slots = base[:, None] + jnp.where(kept, path, idx)  # [B, T]: where window slot d takes its entry from

    def gather(buf):  # buf [L, B, Hk, S, ...] -> the window's new content [L, B, Hk, T, ...]
        at = slots.reshape((1, B, 1, T) + (1,) * (buf.ndim - 4))
        return jnp.take_along_axis(buf, at, axis=3)

    # gathers of T slots, then one scatter per buffer (``write_layer``): XLA updates the cache in place. A
    # per-row vmap of dynamic slices would move the batch axis first and copy the whole cache every step.
    everywhere = jnp.ones((B, T), bool)
    k = write_layer(cache.k, None, gather(cache.k), everywhere, base)
    v = write_layer(cache.v, None, gather(cache.v), everywhere, base)
    p = write_layer(cache.pos, None, jnp.where(kept[None, :, None, :], gather(cache.pos), -1), everywhere, base)
    return KVCache(k=k, v=v, pos=p, length=(base + keep).astype(jnp.int32))
