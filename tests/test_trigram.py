"""ADED's tri-gram table: counts and probabilities against a brute-force count, top-K pruning, the adaptive
update and its cap, int64 keys for large vocabularies, and the .npz save/load round trip."""

from collections import Counter

import numpy as np
import pytest

from jaxspec.drafters.trigram import TrigramTable


def brute_force(texts):
    counts = Counter((t[i], t[i + 1], t[i + 2]) for t in texts for i in range(len(t) - 2))
    totals = Counter()
    for (a, b, _), n in counts.items():
        totals[a, b] += n
    return {k: n / totals[k[:2]] for k, n in counts.items()}


@pytest.mark.parametrize("top_k", [2, 12])
def test_build_equals_brute_force_count(top_k):
    rng = np.random.default_rng(0)
    texts = [rng.integers(0, 6, rng.integers(0, 40)).tolist() for _ in range(30)] + [[1, 2], []]
    table = TrigramTable.build(texts, vocab_size=7, top_k=top_k)  # token 6 never occurs
    probs = brute_force(texts)
    contexts = sorted({k[:2] for k in probs})
    assert table.keys.tolist() == [a * 7 + b for a, b in contexts]
    for a, b in contexts:
        row = sorted(((-p, c) for (x, y, c), p in probs.items() if (x, y) == (a, b)))[:top_k]
        succ, weight = table.row(a, b)
        assert succ.tolist() == [c for _, c in row]  # top-K by probability, ties by id; not renormalised
        np.testing.assert_allclose(weight, [-p for p, _ in row], rtol=1e-6)
    assert table.row(6, 6)[0].size == 0 and table.weight_of(6, 6, 1) == 0.0


def test_large_vocabulary_keys_are_int64():
    V = 151_936
    table = TrigramTable.build([[V - 1, V - 2, 7, V - 1, V - 2, 8]], vocab_size=V)
    assert table.keys.dtype == np.int64 and table.keys.max() > 2**31
    assert table.row(V - 1, V - 2)[0].tolist() == [7, 8]


def test_adaptive_update_and_cap():
    table = TrigramTable.build([[1, 2, 3, 1, 2, 4]], vocab_size=10)
    assert table.weight_of(1, 2, 3) == pytest.approx(0.5)
    seq = [9] * 30 + [1, 2, 3, 7]  # the window: last 16 tokens -> 14 trigrams
    table.update(seq)
    assert table.weight_of(1, 2, 3) == pytest.approx(0.54)
    assert table.weight_of(2, 3, 7) == pytest.approx(0.04)  # created
    assert table.weight_of(9, 9, 9) == pytest.approx(0.04 * 10)  # 12 nines in the window: 10 (9, 9, 9) trigrams
    assert table.row(1, 2)[0].tolist() == [3, 4]
    for _ in range(200):
        table.update([1, 2, 3])
    assert table.weight_of(1, 2, 3) == pytest.approx(3.0)
    table.update([5, 6, 7] + [0] * 16)  # outside the window: untouched
    assert table.weight_of(5, 6, 7) == 0.0


def test_rows_grow_past_top_k_with_updates():
    table = TrigramTable.build([[1, 2, 3], [1, 2, 4]], vocab_size=10, top_k=2)
    table.update([1, 2, 5])
    assert table.row(1, 2)[0].tolist() == [3, 4, 5]


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    table = TrigramTable.build([rng.integers(0, 50, 300).tolist()], vocab_size=50)
    table.update(rng.integers(0, 50, 40).tolist())
    table.save(tmp_path / "t.npz")
    back = TrigramTable.load(tmp_path / "t.npz")
    assert back.vocab_size == 50 and back.overlay == table.overlay
    for name in ("keys", "succ", "weight"):
        np.testing.assert_array_equal(getattr(back, name), getattr(table, name))
    with np.load(tmp_path / "t.npz", allow_pickle=False) as f:
        assert all(f[k].dtype != object for k in f.files)
