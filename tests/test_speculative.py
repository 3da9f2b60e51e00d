"""Speculative decoding: greedy output token-identical to plain decoding for every drafter (registered and
adversarial), per-row acceptance at batch > 1, stop ids and cache_full, the final KV cache, the n-gram matcher
against brute force, and speculative sampling's next-token distribution against the exact one."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from jaxspec import tree as tr
from jaxspec.cache import KVCache
from jaxspec.drafters import Proposal, make_drafter
from jaxspec.drafters.draft_model import DraftModel
from jaxspec.drafters.ngram import NGram, ngram_match
from jaxspec.generation import Sampling, generate_tokens, pad_prompts
from jaxspec.models import forward
from jaxspec.speculative import generate_speculative, speculative_generate_tokens


@pytest.fixture(scope="module")
def target(tiny_hf):
    return jaxspec.load(tiny_hf("llama-linear-rope")[0])


@pytest.fixture(scope="module")
def draft(tiny_hf):
    return jaxspec.load(tiny_hf("qwen3-qknorm-headdim")[0])  # same vocabulary, another architecture and weights


PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [30, 2, 99, 14, 3, 61, 2, 99, 14, 3, 70, 8, 9, 30, 2, 99, 14], [11, 12]]
N = 30  # max_new_tokens everywhere (one output bucket, so tests share compiled programs)


@dataclasses.dataclass(frozen=True)
class Oracle:
    """Adversarial drafter that knows the plain greedy continuation (its "draft model" is the answer key).

    Random tree shapes every step; node tokens are "right" (the true token at the node's depth, on every
    branch), "wrong" (never the true token) or "random" (true with probability 1/2, else random).
    """

    kind: str
    size: int = 6
    vocab: int = 101

    @property
    def tree_size(self):
        return self.size

    def prepare(self, answers):
        truth = np.zeros((len(answers), 64), np.int32)
        for i, (prompt, out) in enumerate(answers):
            truth[i, : len(out)] = out
        return self, (jnp.asarray(truth), jnp.asarray([len(p) for p, _ in answers], jnp.int32))

    def init(self, dparams, prompt_tokens, prompt_lengths, capacity):
        return None

    def propose(self, dparams, state, hist, hist_len, live, rng, sampling):
        truth, plen = dparams
        B, T = hist.shape[0], self.size
        k1, k2, k3, k4 = jax.random.split(rng, 4)
        i = jnp.arange(T)
        parent = jnp.where(i == 0, -1, jnp.floor(jax.random.uniform(k1, (B, T)) * i).astype(jnp.int32))
        valid = i[None, :] < jax.random.randint(k2, (B, 1), 1, T + 1)
        depth = tr.depths(tr.ancestors(tr.Tree(jnp.zeros((B, T), jnp.int32), parent, jnp.ones((B, T), bool))))
        emitted = hist_len - plen  # the root is truth[emitted - 1]
        true = jnp.take_along_axis(truth, jnp.clip(emitted[:, None] + depth - 1, 0, truth.shape[1] - 1), axis=1)
        noise = jax.random.randint(k3, (B, T), 1, self.vocab)
        if self.kind == "right":
            tokens = true
        elif self.kind == "wrong":
            tokens = (true + noise) % self.vocab
        else:
            tokens = jnp.where(jax.random.bernoulli(k4, 0.5, (B, T)), true, noise)
        return Proposal(tr.Tree(tokens, parent, valid)), state

    def update(self, dparams, state, proposal, base, keep):
        return state


def plain(model, prompts, **kw):
    return [r.token_ids for r in jaxspec.generate(model, prompts, temperature=0.0, **kw)]


def spec(model, prompts, drafter, **kw):
    return generate_speculative(model, prompts, drafter, temperature=0.0, **kw)


@pytest.mark.parametrize("kind", ["right", "wrong", "random"])
def test_adversarial_drafters_greedy_equals_plain(target, kind):
    truth = plain(target, PROMPTS, max_new_tokens=N, stop_ids=[])
    drafter = Oracle(kind)
    res = spec(target, PROMPTS, drafter, draft_model=list(zip(PROMPTS, truth)), max_new_tokens=N, stop_ids=[])
    assert [r.token_ids for r in res] == truth
    assert all(r.finish_reason == "length" for r in res)
    for r in res:  # tokens = first (from the prefill) + accepted drafts + one bonus per step, the last step cut
        h = r.accepted_per_step["histogram"]
        assert r.target_forwards == 1 + sum(h)
        assert 0 <= 1 + sum((a + 1) * c for a, c in enumerate(h)) - len(r.token_ids) < drafter.size
    means = [r.accepted_per_step["mean"] for r in res]
    if kind == "wrong":
        assert means == [0.0, 0.0, 0.0]
    if kind == "right":
        assert min(means) > 1.0  # every step accepts the deepest node of a random tree


@pytest.mark.parametrize("drafter", [NGram(k=4), Oracle("random")], ids=["ngram", "oracle"])
def test_stop_ids_and_cache_full_match_plain(target, drafter):
    truth = plain(target, PROMPTS, max_new_tokens=N, stop_ids=[])
    answers = list(zip(PROMPTS, truth)) if isinstance(drafter, Oracle) else None
    stop = truth[1][6]
    want = plain(target, PROMPTS, max_new_tokens=N, stop_ids=[stop])
    got = spec(target, PROMPTS, drafter, draft_model=answers, max_new_tokens=N, stop_ids=[stop])
    assert [r.token_ids for r in got] == want
    assert got[1].finish_reason == "stop"
    for cap in (24, 40):  # the padded batch takes 24 slots; rows of 7, 17 and 2 tokens run out at different steps
        want = jaxspec.generate(target, PROMPTS, max_new_tokens=N, stop_ids=[], cache_capacity=cap)
        got = spec(target, PROMPTS, drafter, draft_model=answers, max_new_tokens=N, stop_ids=[], cache_capacity=cap)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
    assert [r.finish_reason for r in got] == ["length", "cache_full", "length"]


def test_ngram_drafter_and_registry(target):
    assert make_drafter("draft-model", tree_size=5) == DraftModel(k=4)
    res = spec(target, PROMPTS, make_drafter("ngram", tree_size=5), max_new_tokens=N, stop_ids=[])
    assert [r.token_ids for r in res] == plain(target, PROMPTS, max_new_tokens=N, stop_ids=[])
    assert max(r.accepted_per_step["mean"] for r in res) > 0.3  # the tiny model repeats itself: lookups hit
    with pytest.raises(ValueError):
        make_drafter("nope")


def test_ngram_match_equals_brute_force():
    rng = np.random.default_rng(0)
    B, H, k = 64, 24, 4
    hist = rng.integers(0, 4, (B, H)).astype(np.int32)
    hist_len = rng.integers(1, H + 1, B).astype(np.int32)
    drafts, n = map(np.asarray, ngram_match(jnp.asarray(hist), jnp.asarray(hist_len), k, 1, 3))
    for b in range(B):
        s = hist[b, : hist_len[b]].tolist()
        want = []
        for m in (3, 2, 1):
            starts = [i for i in range(len(s) - m) if s[i:i + m] == s[len(s) - m:]]
            if len(s) > m and starts:
                want = s[starts[0] + m: starts[0] + m + k]
                break
        assert drafts[b, : n[b]].tolist() == want


def test_draft_model_greedy_equals_plain(target, draft):
    truth = plain(target, PROMPTS, max_new_tokens=N, stop_ids=[])
    for k in (1, 3):
        res = spec(target, PROMPTS, DraftModel(k=k), draft_model=draft, max_new_tokens=N, stop_ids=[])
        assert [r.token_ids for r in res] == truth
    with pytest.raises(ValueError):
        spec(target, PROMPTS, DraftModel(k=3), max_new_tokens=4)


def test_draft_model_equal_to_target_accepts_everything(target):
    """The draft cache stays in sync with the accepted prefix: a draft equal to the target is always right."""
    k = 3
    res = spec(target, PROMPTS, DraftModel(k=k), draft_model=target, max_new_tokens=29, stop_ids=[])
    assert [r.token_ids for r in res] == plain(target, PROMPTS, max_new_tokens=29, stop_ids=[])
    for r in res:
        assert r.accepted_per_step["histogram"] == [0] * k + [7]  # 7 steps of k + 1 tokens after the first one
        assert r.target_forwards == 8


def test_final_cache_equals_plain_decoding(target, draft):
    cfg = target.config
    batch = pad_prompts(PROMPTS)
    args = (batch.tokens, batch.lengths)
    common = (jax.random.PRNGKey(0), jnp.int32(20), jnp.full((8,), -1, jnp.int32), Sampling.make())
    cap = 48
    ref = generate_tokens(target.params, *args, KVCache.create(cfg, 3, cap), *common, cfg=cfg, max_steps=32)
    drafter, dparams = DraftModel(k=3).prepare(draft)
    out = speculative_generate_tokens(target.params, dparams, *args, *common, cfg=cfg, drafter=drafter,
                                      max_steps=32, capacity=cap)
    np.testing.assert_array_equal(out.tokens, ref.tokens[:, :32])
    got, want = out.cache, ref.cache
    np.testing.assert_array_equal(got.length, want.length)
    np.testing.assert_array_equal(got.pos[:, :, :, :cap], want.pos)
    assert (np.asarray(got.pos[:, :, :, cap:]) == -1).all()
    ok = np.asarray(want.pos >= 0)[..., None]
    np.testing.assert_allclose(np.where(ok, got.k[:, :, :, :cap], 0), np.where(ok, want.k, 0), atol=1e-5)
    np.testing.assert_allclose(np.where(ok, got.v[:, :, :, :cap], 0), np.where(ok, want.v, 0), atol=1e-5)


def test_the_compiled_loop_updates_the_cache_in_place(target):
    """No whole-cache copy or transpose inside the compiled loop: the tree forward writes the cache in place
    and the compaction rewrites one window with gathers and a scatter. (A per-row vmap of dynamic slices
    moved the batch axis first, and XLA then transposed and copied every cache buffer each step.)"""
    cfg = target.config
    batch = pad_prompts(PROMPTS)
    drafter, dparams = NGram(k=4).prepare(None)
    cap = 43  # + the tree's 5 spare slots: 48, a size no other array here has
    hlo = speculative_generate_tokens.lower(
        target.params, dparams, batch.tokens, batch.lengths, jax.random.PRNGKey(0), jnp.int32(20),
        jnp.full((8,), -1, jnp.int32), Sampling.make(), cfg=cfg, drafter=drafter, max_steps=32, capacity=cap,
    ).compile().as_text()
    dims = sorted(KVCache.create(cfg, 3, cap + drafter.tree_size).k.shape)
    ops = [op for shape, op in re.findall(r"= f32\[([\d,]+)\]\{[^}]*\} ([\w-]+)\(", hlo)
           if sorted(map(int, shape.split(","))) == dims]  # the cache's K or V, in any axis order
    assert ops, "no cache-shaped op found: the pattern no longer matches XLA's text"
    assert "transpose" not in ops
    assert ops.count("copy") <= 2  # the empty cache's K and V, made once before the loop


def exact_second_token(model, prompt, sampling):
    """Exact marginal of the second sampled token: sum over x1 of p(x1 | prompt) p(x2 | prompt, x1)."""
    from jaxspec.speculative import sampling_probs

    cfg, V = model.config, model.config.vocab_size
    P = len(prompt)
    toks = jnp.concatenate([jnp.tile(jnp.asarray(prompt)[None], (V, 1)), jnp.arange(V)[:, None]], 1)
    logits, _, _ = forward(model.params, cfg, toks, jnp.broadcast_to(jnp.arange(P + 1), (V, P + 1)),
                           KVCache.create(cfg, V, P + 1))
    p1 = sampling_probs(logits[0, P - 1], sampling)
    p2 = sampling_probs(logits[:, P], sampling)
    return np.asarray(p1 @ p2, np.float64)


@pytest.mark.parametrize("which", ["draft-model", "ngram"])
def test_speculative_sampling_matches_the_target_distribution(target, draft, which):
    """Many rows of one prompt in one batch: the second token (the first one drawn by verification) follows
    the exact plain-sampling marginal (chi-square goodness of fit on bins of expected count >= 5)."""
    n, temperature, top_k = 2000, 0.8, 12
    if which == "draft-model":
        prompt, drafter, min_accepted = [5, 6, 5, 6, 5], DraftModel(k=2), 0.05
    else:  # many distinct prompt tokens: the first sampled token is often found, and its successor proposed
        prompt, drafter, min_accepted = list(range(3, 60)), NGram(k=2, min_n=1, max_n=1), 0.005
    res = generate_speculative(target, [prompt] * n, drafter, draft_model=draft, max_new_tokens=3, stop_ids=[],
                               temperature=temperature, top_k=top_k, seed=1)
    second = np.array([r.token_ids[1] for r in res])
    want = exact_second_token(target, prompt, Sampling.make(temperature, top_k))
    expected = want * n
    big = expected >= 5
    assert want[~big].sum() < 0.05
    counts = np.bincount(second, minlength=want.size)
    observed = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    chi2 = ((observed - exp) ** 2 / np.maximum(exp, 1e-9)).sum()
    dof = len(exp) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)  # ~5 sigma: fails for a biased sampler, not by chance
    assert np.mean([r.accepted_per_step["mean"] for r in res]) > min_accepted  # drafts do get accepted


@pytest.mark.real
def test_real_qwen_coder_greedy_speculative_equals_plain():
    """Qwen2.5-Coder-0.5B: n-gram and the 0.5B as its own draft model reproduce plain greedy decoding."""
    model = jaxspec.load("qwen2.5-coder-0.5b-instruct", quiet=True)
    prompt = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    want = jaxspec.generate(model, prompt, max_new_tokens=48).token_ids
    for drafter, min_accepted in ((NGram(k=5), 0.1), (DraftModel(k=3), 2.5)):
        got = generate_speculative(model, prompt, drafter, draft_model=model, max_new_tokens=48, profile=True)
        print(type(drafter).__name__, got.accepted_per_step, got.target_forwards, got.timings)
        assert got.token_ids == want
        assert got.accepted_per_step["mean"] > min_accepted
