"""ADED drafter: greedy output token-identical to plain decoding (both value modes, batch > 1, tables that do
and do not predict the output), the MCTS (determinism, released visits = the prior-driven allocation, intended
visits differ), tree assembly and the budget cut against naive references, the adaptive update (once per live
row and step, persisting across calls, off with adapt=False), lossless sampling over sibling drafts,
`jaxspec trigram build` and the CLI's error cases."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

import jaxspec
from conftest import shared_asset
from jaxspec.api import InputError
from jaxspec.cache import KVCache
from jaxspec.cli import main as cli
from jaxspec.drafters import make_drafter
from jaxspec.drafters.aded import ADED, assemble, cut_to_choices
from jaxspec.drafters.trigram import TrigramTable, TrigramTableError
from jaxspec.generation import Sampling
from jaxspec.models import forward
from jaxspec.speculative import HOST_DRAFT_TIMER, generate_speculative, sampling_probs

V = 101
PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [30, 2, 99, 14, 3, 61, 2, 99, 14, 3, 70, 8, 9, 30, 2, 99, 14], [11, 12]]
N = 30


@pytest.fixture(scope="module")
def target(tiny_hf):
    return jaxspec.load(tiny_hf("llama-linear-rope")[0])


@pytest.fixture(scope="module")
def truth(target):
    return plain(target, PROMPTS)


def plain(model, prompts, **kw):
    return [r.token_ids for r in jaxspec.generate(model, prompts, max_new_tokens=N, stop_ids=[], **kw)]


def spec(model, prompts, drafter, **kw):
    return jaxspec.generate(model, prompts, max_new_tokens=N, stop_ids=[], speculative=drafter, **kw)


def table_from_rows(rows: dict, vocab_size: int = V) -> TrigramTable:
    """A table with exactly these rows: {(a, b): {c: weight}}."""
    keys = sorted(a * vocab_size + b for a, b in rows)
    K = max(len(r) for r in rows.values())
    succ = np.full((len(keys), K), -1, np.int32)
    weight = np.zeros((len(keys), K), np.float32)
    for i, key in enumerate(keys):
        items = sorted(rows[divmod(key, vocab_size)].items(), key=lambda cw: (-cw[1], cw[0]))
        succ[i, : len(items)] = [c for c, _ in items]
        weight[i, : len(items)] = [w for _, w in items]
    return TrigramTable(vocab_size, keys, succ, weight)


def steps(results):
    return sum(sum(r.accepted_per_step["histogram"]) for r in results)


@pytest.mark.parametrize("value", ["released", "intended"])
def test_greedy_equals_plain(target, truth, value):
    rng = np.random.default_rng(0)
    noise = TrigramTable.build([rng.integers(0, V, 400).tolist() for _ in range(4)], V)
    res = spec(target, PROMPTS, ADED(table=noise, value=value))
    assert [r.token_ids for r in res] == truth
    assert HOST_DRAFT_TIMER.rows == steps(res)  # one search (and one adaptation) per live row and step
    assert all(r.timings["drafting"] > 0 for r in res)

    knows = TrigramTable.build([p + o for p, o in zip(PROMPTS, truth)], V)
    res = spec(target, PROMPTS, ADED(table=knows, value=value))
    assert [r.token_ids for r in res] == truth
    assert min(r.accepted_per_step["mean"] for r in res) > 1.0  # the table predicts the output: long accepts


def test_batch_of_two_rows_of_different_lengths_and_stops(target, truth):
    """Rows stop at different steps (a stop id, a length limit); a row that stopped is not searched."""
    prompts = PROMPTS[:2]
    stop = truth[1][5]
    want = [r.token_ids for r in jaxspec.generate(target, prompts, max_new_tokens=N, stop_ids=[stop])]
    drafter = make_drafter("aded", tree_size=9, table=TrigramTable.build([p + o for p, o in zip(prompts, truth)], V))
    assert drafter.budget == 8 and drafter.tree_size == 9
    got = jaxspec.generate(target, prompts, max_new_tokens=N, stop_ids=[stop], speculative=drafter)
    assert [r.token_ids for r in got] == want
    assert [r.finish_reason for r in got] == ["length", "stop"]
    assert HOST_DRAFT_TIMER.rows == steps(got) and steps(got[1:]) < steps(got[:1])
    single = jaxspec.generate(target, prompts[1], max_new_tokens=N, stop_ids=[stop], speculative=drafter)
    assert single.token_ids == want[1]


def crafted_table():
    """Root context (1, 2) with three successors; only 12's subtree is heavy; no row contains its own context's
    second token, so the released value is exactly 1.0."""
    return table_from_rows({(1, 2): {10: 0.5, 11: 0.3, 12: 0.2},
                            (2, 10): {20: 0.1, 30: 0.05}, (2, 11): {21: 0.1}, (2, 12): {22: 3.0, 23: 2.5},
                            (12, 22): {40: 3.0}, (12, 23): {41: 3.0}, (22, 40): {50: 3.0}, (10, 20): {60: 0.1}})


def prior_driven_visits(prior, iterations):
    """The released search at the root: the last child first (expansion), then each unvisited child in order,
    then argmax 1 + f P_j / (1 + N_j) with f the shared exploration factor (i.e. argmax P_j / (1 + N_j))."""
    visits = [0] * len(prior)
    visits[-1] = 1
    for total in range(1, iterations):
        if 0 in visits:
            visits[visits.index(0)] += 1
            continue
        f = (32.0 + math.log((total + 8.0 + 1) / 8.0)) * math.sqrt(total)
        scores = [1.0 + f * p / (1 + n) for p, n in zip(prior, visits)]
        visits[int(np.argmax(scores))] += 1
    return visits


def test_mcts_is_deterministic_and_released_visits_follow_the_prior():
    table = crafted_table()
    released = ADED(table=table, value="released", adapt=False)
    tree = released.search(1, 2, seed=7)
    assert tree == released.search(1, 2, seed=7) and released.draft(1, 2, 7) == released.draft(1, 2, 7)
    assert tree.token[1:4] == [10, 11, 12] and tree.visits[0] == 150
    assert all(w == n for w, n in zip(tree.value, tree.visits))  # every value is exactly 1.0
    prior = [float(np.float32(p)) for p in (0.5, 0.3, 0.2)]
    assert tree.visits[1:4] == prior_driven_visits(prior, 150)

    intended = ADED(table=table, value="intended", adapt=False).search(1, 2, seed=7)
    assert intended.visits[1:4] != tree.visits[1:4]
    assert intended.visits[3] > tree.visits[3]  # 12's heavy subtree pulls visits once values count

    assert ADED(table=table).search(3, 4).visits == [0]  # unknown root context: nothing searched
    assert ADED(table=table).draft(3, 4) == ([], [])  # a root-only tree (no dummy token)


def naive_tree(paths, budget):
    """Reference assembly from token tuples: prefix closure, ordered by depth then per-depth first-appearance
    ranks of the tokens, cut to ``budget``; returns the kept nodes as token paths."""
    rank = {}
    for p in paths:
        for d, t in enumerate(p):
            rank.setdefault((d, t), sum(1 for (dd, _) in rank if dd == d))
    closure = {p[:k] for p in paths for k in range(1, len(p) + 1)}
    return sorted(closure, key=lambda q: (len(q), [rank[d, t] for d, t in enumerate(q)]))[:budget]


def tree_paths(tokens, parents):
    out = []
    for i, (t, p) in enumerate(zip(tokens, parents)):
        assert 0 <= p <= i  # parent index (0 = root) below the node's own index i + 1
        out.append((out[p - 1] if p else ()) + (t,))
    return out


def test_assembly_and_budget_cut_against_naive_references():
    rng = np.random.default_rng(3)
    for _ in range(300):
        n = int(rng.integers(1, 12))
        paths = list(dict.fromkeys(tuple(rng.integers(0, 4, rng.integers(1, 5)).tolist()) for _ in range(n)))
        budget = int(rng.integers(1, 30))
        tokens, parents = assemble(paths, budget)
        got = tree_paths(tokens, parents)
        assert got == naive_tree(paths, budget)
        assert len(got) == len(set(got)) <= budget
        assert all(q[:-1] in got or len(q) == 1 for q in got)  # prefix-closed
        if budget >= len({p[:k] for p in paths for k in range(1, len(p) + 1)}):
            assert set(got) == {p[:k] for p in paths for k in range(1, len(p) + 1)}

        kept = cut_to_choices(paths, budget)
        want = list(range(len(paths)))
        while sum(len(set(paths[i])) for i in want) > budget:  # drop the most distinct tokens, the later on ties
            want.remove(max(want, key=lambda i: (len(set(paths[i])), i)))
        assert kept == [paths[i] for i in want]


def test_drafted_trees_fit_the_budget():
    rng = np.random.default_rng(1)
    table = TrigramTable.build([rng.integers(0, 6, 3000).tolist()], 6)  # dense rows: the budget binds
    for budget in (1, 4, 12, 64):
        drafter = ADED(table=table, budget=budget, adapt=False)
        for a in range(6):
            tokens, parents = drafter.draft(a, (a + 1) % 6, seed=a)
            got = tree_paths(tokens, parents)
            assert len(got) <= budget and len(set(got)) == len(got)
            assert got or budget == 1  # the distinct-token cut can leave nothing below 2 (paths are >= 2 long)
            assert max(map(len, got), default=0) <= drafter.depth  # depth - 1 search levels + one greedy extension
        tokens, parent, valid = drafter._host_propose(np.array([[-1] * 14 + [0, 1], [2] * 16]), np.array([True, False]),
                                                      np.array([5, 6], np.int32))
        assert valid[0].sum() == 1 + len(drafter.draft(0, 1, 5)[0]) and valid[1].tolist() == [True] + [False] * budget
        assert (parent[0, 1:] < np.arange(1, budget + 1)).all() and parent[0, 0] == -1


def test_adaptation_persists_across_calls_and_is_off_without_adapt(target, truth):
    base = TrigramTable.build([PROMPTS[0] + truth[0][:3]], V)
    off = TrigramTable.build([PROMPTS[0] + truth[0][:3]], V)
    spec(target, PROMPTS[0], ADED(table=off, adapt=False))
    assert off.overlay == {}
    drafter = ADED(table=base)
    spec(target, PROMPTS[0], drafter)
    first = {k: dict(v) for k, v in base.overlay.items()}
    a, b, c = PROMPTS[0][-2], PROMPTS[0][-1], truth[0][0]  # in the window from the first step on
    assert base.weight_of(a, b, c) >= off.weight_of(a, b, c) + 0.04 * 2 - 1e-6
    spec(target, PROMPTS[0], drafter)  # the same table object keeps learning
    assert base.weight_of(a, b, c) > first[base.key(a, b)][c]
    assert all(w <= 3.0 for row in base.overlay.values() for w in row.values())


def exact_probs(model, prompt, sampling):
    """p1 = the first sampled token's distribution, p2[x] = the second one's given the first was x."""
    cfg = model.config
    P = len(prompt)
    toks = jnp.concatenate([jnp.tile(jnp.asarray(prompt)[None], (V, 1)), jnp.arange(V)[:, None]], 1)
    logits, _, _ = forward(model.params, cfg, toks, jnp.broadcast_to(jnp.arange(P + 1), (V, P + 1)),
                           KVCache.create(cfg, V, P + 1))
    return (np.asarray(sampling_probs(logits[0, P - 1], sampling), np.float64),
            np.asarray(sampling_probs(logits[:, P], sampling), np.float64))


def test_speculative_sampling_over_sibling_drafts_matches_the_target(target):
    """Each step's tree is the root plus four deterministic siblings (the four likeliest second tokens): the
    second token still follows the exact plain-sampling marginal (chi-square, as in test_speculative)."""
    n, temperature, top_k, prompt = 2000, 0.8, 12, [5, 6, 5, 6, 5]
    sampling = Sampling.make(temperature, top_k)
    p1, p2 = exact_probs(target, prompt, sampling)
    rows = {(prompt[-1], x): {int(c): float(p2[x, c]) + 1e-3 for c in np.argsort(-p2[x])[:4]} for x in range(V)}
    drafter = ADED(table=table_from_rows(rows), adapt=False, iterations=20, budget=8)
    assert drafter.draft(prompt[-1], int(np.argmax(p1)))[1].count(0) == 4  # four children of the root
    res = generate_speculative(target, [prompt] * n, drafter, max_new_tokens=3, stop_ids=[],
                               temperature=temperature, top_k=top_k, seed=1)
    second = np.array([r.token_ids[1] for r in res])
    want = p1 @ p2
    expected = want * n
    big = expected >= 5
    assert want[~big].sum() < 0.05
    counts = np.bincount(second, minlength=V)
    observed = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    chi2 = ((observed - exp) ** 2 / np.maximum(exp, 1e-9)).sum()
    dof = len(exp) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)
    hist = np.array([r.accepted_per_step["histogram"] for r in res]).sum(0)
    assert hist[1:].sum() > 0.3 * hist.sum()  # siblings do get accepted


def test_cli_trigram_build_equals_table_build(tmp_path, capsys):
    gguf = shared_asset("tinyllamas/tinyllamas-stories-260k-f32.gguf")
    texts = ["Once upon a time there was a cat.", "The cat sat on the mat. The cat was happy.", "Hi"]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t, encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    out = tmp_path / "t.npz"
    assert cli(["trigram", "build", "--model", str(gguf), "--input", str(tmp_path / "*.txt"), "--out", str(out),
                "--top-k", "3", "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    model = jaxspec.load(gguf)
    ids = [model.tokenizer.encode(t) for t in texts]
    want = TrigramTable.build(ids, model.config.vocab_size, top_k=3)
    got = TrigramTable.load(out)
    assert got.vocab_size == model.config.vocab_size
    for name in ("keys", "succ", "weight"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert summary | {"seconds": 0} == {"out": str(out), "vocab_size": model.config.vocab_size, "top_k": 3,
                                        "files": 3, "skipped": 1, "tokens": sum(map(len, ids)),
                                        "contexts": int(want.keys.size), "seconds": 0}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_cli_generate_with_aded_and_error_cases(target, tiny_hf, tmp_path, capsys):
    model_dir = str(tiny_hf("llama-linear-rope")[0])
    table = tmp_path / "t.npz"
    TrigramTable.build([PROMPTS[1] * 3], V).save(table)
    base = ["generate", "--model", model_dir, "--prompt-ids", ",".join(map(str, PROMPTS[1])), "--max-new-tokens",
            "12", "--stop-ids", ""]
    assert cli(base + ["--speculative", "aded", "--trigram", str(table), "--tree-size", "9",
                       "--aded-value", "intended", "--no-adapt", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 12 and out["target_forwards"] >= 2 and out["timings"]["drafting"] > 0
    assert TrigramTable.load(table).overlay == {}  # --no-adapt; and the run never writes the file anyway

    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.savez(tmp_path / "other.npz", keys=np.arange(3))
    TrigramTable.build([[1, 2, 3]], 50).save(tmp_path / "v50.npz")
    bad = [
        (["--speculative", "aded"], "needs --trigram"),
        (["--speculative", "aded", "--trigram", str(tmp_path / "missing.npz")], "no such tri-gram table"),
        (["--speculative", "aded", "--trigram", str(tmp_path / "junk.npz")], "not a readable tri-gram table"),
        (["--speculative", "aded", "--trigram", str(tmp_path / "other.npz")], "arrays missing"),
        (["--speculative", "aded", "--trigram", str(tmp_path / "v50.npz")], "vocabulary of 50 ids"),
        (["--trigram", str(table)], "needs --speculative"),
        (["--speculative", "ngram", "--no-adapt"], "apply to --speculative aded only"),
    ]
    for extra, message in bad:
        assert cli(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert cli(["trigram", "build", "--model", model_dir, "--input", str(tmp_path / "*.nothing"),
                "--out", str(tmp_path / "x.npz")]) == 2
    assert "matches no file" in capsys.readouterr().err

    with pytest.raises(TrigramTableError):
        TrigramTable.load(tmp_path / "junk.npz")
    with pytest.raises(InputError, match="vocabulary of 50"):
        jaxspec.generate(target, PROMPTS[0], speculative=ADED(table=TrigramTable.load(tmp_path / "v50.npz")))
    with pytest.raises(ValueError, match="needs a tri-gram table"):
        make_drafter("aded")
    with pytest.raises(ValueError, match="value must be"):
        ADED(table=TrigramTable.load(table), value="fixed")


@pytest.mark.real
def test_real_qwen_coder_aded_greedy_equals_plain(tmp_path):
    """Qwen2.5-Coder-0.5B with a small table from a few standard-library modules reproduces plain greedy."""
    import sysconfig
    from pathlib import Path

    from jaxspec.drafters.trigram import build_from_files

    model = jaxspec.load("qwen2.5-coder-0.5b-instruct", quiet=True)
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = [lib / n for n in ("functools.py", "textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py")]
    table, summary = build_from_files(files, model.tokenizer, model.config.vocab_size)
    prompt = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    want = jaxspec.generate(model, prompt, max_new_tokens=48).token_ids
    for value in ("released", "intended"):
        got = generate_speculative(model, prompt, ADED(table=table, value=value, budget=16), max_new_tokens=48)
        print(value, summary, got.accepted_per_step["mean"], got.target_forwards, got.timings)
        assert got.token_ids == want
        assert got.accepted_per_step["mean"] > 0.3
