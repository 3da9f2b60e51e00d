"""Tree buffers against naive Python references: attention mask, depths/positions, retrieve paths, greedy and
sampled acceptance; KV compaction against the cache plain decoding builds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec import tree as tr
from jaxspec.cache import KVCache
from jaxspec.models import forward


def random_trees(rng, B, T):
    """Random topologically ordered trees; valid nodes a random-length prefix (root always valid)."""
    parent = np.full((B, T), -1, np.int32)
    for i in range(1, T):
        parent[:, i] = rng.integers(0, i, B)
    n_valid = rng.integers(1, T + 1, B)
    valid = np.arange(T)[None, :] < n_valid[:, None]
    tokens = rng.integers(0, 7, (B, T)).astype(np.int32)
    return tr.Tree(jnp.asarray(tokens), jnp.asarray(parent), jnp.asarray(valid))


def naive_path(parent, i):
    path = [i]
    while parent[path[-1]] >= 0:
        path.append(int(parent[path[-1]]))
    return path[::-1]


@pytest.mark.parametrize("T", [1, 2, 7, 16, 33])
def test_mask_depth_positions_paths_equal_naive_reference(T):
    rng = np.random.default_rng(T)
    B = 5
    t = random_trees(rng, B, T)
    anc = tr.ancestors(t)
    depth = tr.depths(anc)
    base = jnp.asarray(rng.integers(0, 50, B), jnp.int32)
    pos = tr.positions(t, base, depth)
    paths = tr.retrieve_paths(anc, depth)
    parent, valid = np.asarray(t.parent), np.asarray(t.valid)
    for b in range(B):
        for i in range(T):
            if not valid[b, i]:
                assert not np.asarray(anc)[b, i].any() and pos[b, i] == -1
                continue
            p = naive_path(parent[b], i)
            want = np.zeros(T, bool)
            want[p] = True
            assert (np.asarray(anc)[b, i] == want).all()
            assert depth[b, i] == len(p) - 1 and pos[b, i] == base[b] + len(p) - 1
            assert np.asarray(paths)[b, i].tolist() == p + [-1] * (T - len(p))


def test_chain_is_a_one_path_tree():
    t = tr.chain(jnp.array([[4, 5, 6, 7]]), jnp.array([3]))
    anc = tr.ancestors(t)
    assert np.asarray(tr.depths(anc)).tolist() == [[0, 1, 2, -1]]
    assert np.asarray(anc[0]).astype(int).tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]


def test_greedy_accept_is_the_longest_matching_path():
    rng = np.random.default_rng(0)
    B, T, V = 64, 12, 5
    t = random_trees(rng, B, T)
    logits = jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32)
    anc = tr.ancestors(t)
    depth = tr.depths(anc)
    best = np.asarray(tr.greedy_accept(t, anc, depth, logits))
    pred = np.asarray(logits).argmax(-1)
    tokens, parent, valid = np.asarray(t.tokens), np.asarray(t.parent), np.asarray(t.valid)
    lengths = []
    for b in range(B):
        ok = [i for i in range(T) if valid[b, i]
              and all(tokens[b, j] == pred[b, parent[b, j]] for j in naive_path(parent[b], i)[1:])]
        deepest = max(len(naive_path(parent[b], i)) for i in ok)
        want = min(i for i in ok if len(naive_path(parent[b], i)) == deepest)
        assert best[b] == want
        lengths.append(deepest - 1)
    assert max(lengths) >= 2  # the random trees do exercise multi-token acceptance


def _first_emitted(t, p, q, n):
    """First token emitted by ``sample_accept`` (the depth-1 node's token, or the bonus) over n draws. With
    ``q``, every draft node's token is drawn from its q afresh for each draw (as a drafter would)."""
    anc = tr.ancestors(t)
    depth = tr.depths(anc)

    def one(key):
        k0, k1, k2 = jax.random.split(key, 3)
        tokens = t.tokens
        if q is not None:
            drawn = jax.random.categorical(k0, jnp.log(q), axis=-1).astype(jnp.int32)
            tokens = jnp.where(jnp.arange(t.size) > 0, drawn, tokens)
        tt = tr.Tree(tokens, t.parent, t.valid)
        best, res = tr.sample_accept(tt, p, q, jax.random.uniform(k1, tokens.shape))
        bonus = jax.random.categorical(k2, jnp.log(res), axis=-1)
        path = tr.path_to(anc, depth, best)
        return jnp.where(path[:, 1] >= 0, jnp.take_along_axis(tokens, jnp.maximum(path[:, 1:2], 0), 1)[:, 0], bonus)

    return np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.PRNGKey(0), n)))[:, 0]


def _assert_matches(draws, p, n):
    counts = np.bincount(draws, minlength=p.size)
    expected = p * n
    chi2 = ((counts - expected) ** 2 / np.maximum(expected, 1e-9))[expected > 0].sum()
    assert counts[expected == 0].sum() == 0
    assert chi2 < 30, (counts, expected)  # dof <= 7: p-value far below 1e-4


def test_sample_accept_tree_of_deterministic_drafts_samples_the_target():
    V, n = 8, 20000
    t = tr.Tree(jnp.array([[0, 3, 5, 1, 2]]), jnp.array([[-1, 0, 0, 1, 0]]), jnp.ones((1, 5), bool))
    p = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(1), (1, 5, V)) * 1.5, -1)
    _assert_matches(_first_emitted(t, p, None, n), np.asarray(p[0, 0]), n)


def test_sample_accept_chain_with_draft_distribution_samples_the_target():
    V, n = 8, 20000
    t = tr.chain(jnp.array([[0, 3, 4]]), jnp.array([3]))
    p = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(2), (1, 3, V)) * 1.5, -1)
    q = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(3), (1, 3, V)), -1)
    _assert_matches(_first_emitted(t, p, q, n), np.asarray(p[0, 0]), n)


@pytest.fixture(scope="module")
def model(tiny_hf):
    return jaxspec.load(tiny_hf("llama-linear-rope")[0])


def test_compaction_leaves_the_cache_plain_decoding_builds(model):
    cfg, params = model.config, model.params
    rng = np.random.default_rng(5)
    B, P, T, S = 2, 6, 9, 32
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, P)), jnp.int32)
    pos0 = jnp.broadcast_to(jnp.arange(P), (B, P))
    _, cache, _ = forward(params, cfg, prompt, pos0, KVCache.create(cfg, B, S))
    t = random_trees(rng, B, T)
    t = tr.Tree(jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32), t.parent, jnp.ones((B, T), bool))
    anc = tr.ancestors(t)
    depth = tr.depths(anc)
    base = cache.length
    _, tree_cache, _ = forward(params, cfg, t.tokens, tr.positions(t, base, depth), cache, mask_info=anc)
    node = jnp.argmax(depth, axis=1).astype(jnp.int32)  # a deepest node per row
    path = tr.path_to(anc, depth, node)
    keep = jnp.take_along_axis(depth, node[:, None], 1)[:, 0] + 1
    compacted = tr.compact(tree_cache, base, path, keep)

    for b in range(B):  # plain decoding of the path's tokens, one at a time
        toks = np.asarray(t.tokens)[b, np.asarray(path)[b, : int(keep[b])]]
        _, ref, _ = forward(params, cfg, prompt[b:b + 1], pos0[:1], KVCache.create(cfg, 1, S))
        for j, x in enumerate(toks):
            _, ref, _ = forward(params, cfg, jnp.array([[x]]), jnp.array([[P + j]]), ref)
        assert int(compacted.length[b]) == int(ref.length[0])
        np.testing.assert_array_equal(compacted.pos[:, b], ref.pos[:, 0])
        n = int(ref.length[0])
        np.testing.assert_allclose(compacted.k[:, b, :, :n], ref.k[:, 0, :, :n], atol=1e-5)
        np.testing.assert_allclose(compacted.v[:, b, :, :n], ref.v[:, 0, :, :n], atol=1e-5)
