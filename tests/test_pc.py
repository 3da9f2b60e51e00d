"""Prompt compression on tiny random models: the kept positions equal a plain numpy reference of each method
computed from transformers' attention probabilities / logits (each row alone); exactly ``capacity`` tokens
in original order with the window, short prompts unchanged, batch rows independent, errors; API (SpecKV-PC
reuses the draft's lookahead; SpecPrefill's original positions) and CLI."""

import json

import numpy as np
import pytest
import torch

import jaxspec
from conftest import hf_attentions
from jaxspec.api import InputError
from jaxspec.cli import main
from jaxspec.kv import SpecKV
from jaxspec.pc import METHODS, DraftPPL, Random, Recency, SpecPC, SpecPrefill, compress, make_method

C, W = 16, 4
LENGTHS = (40, 12, 57)  # the middle row fits in the capacity


@pytest.fixture(scope="module")
def draft(qwen_with_eager_reference):
    return qwen_with_eager_reference


@pytest.fixture(scope="module")
def target(llama_same_vocabulary):
    return llama_same_vocabulary


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(11)
    return [rng.integers(3, 101, n).tolist() for n in LENGTHS]


def hf_greedy(ref, ids, steps, stop=()):
    out = []
    for _ in range(steps):
        with torch.no_grad():
            t = int(ref(torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(t)
        if t in stop:
            break
    return out


def np_specpc(ref, ids, look, pc: SpecPC):
    """The reference algorithm step by step (§2.2): reduce per step over heads and rows, then layers, then
    steps; pool with explicit zero padding; seeds in score order (ties: lowest position); expand; window
    first; order-preserving unique; first C; sort."""
    n, Wn, Cn = len(ids), pc.window_size, pc.capacity
    if n <= Cn:
        return list(range(n))
    A = hf_attentions(ref, ids + look[:-1])  # the decode queries see the prompt and the earlier lookahead
    red = np.max if pc.reduction_type == "max" else np.sum
    w = np.linspace(0, 1, Wn) if pc.weighted_query else np.ones(Wn)
    L0 = pc.starting_layer_index
    steps = [red(red(A[L0:, :, n - Wn:n, :n] * w[:, None], axis=(1, 2)), axis=0)]
    steps += [red(red(A[L0:, :, n + t - 1, :n], axis=1), axis=0) for t in range(1, len(look))]
    S = red(np.stack(steps), axis=0)
    k = pc.kernel_size
    win = np.lib.stride_tricks.sliding_window_view(np.pad(S, ((k - 1) // 2, k - 1 - (k - 1) // 2)), k)
    pooled = win.max(-1) if pc.pool_type == "max" else win.mean(-1)
    seeds = sorted(range(n), key=lambda j: (-pooled[j], j))[:Cn]
    N = k if pc.neighbor_tokens is None else pc.neighbor_tokens
    offsets = sorted(range(-((N - 1) // 2), N - 1 - (N - 1) // 2 + 1), key=abs) if N else [0]
    order = list(range(n - Wn, n)) + [min(max(s + d, 0), n - 1) for s in seeds for d in offsets]
    return sorted(list(dict.fromkeys(order))[:Cn])


def top(priority, budget):
    return sorted(sorted(range(len(priority)), key=lambda j: (-priority[j], j))[:budget])


def np_specprefill(ref, ids, look, pc: SpecPrefill):
    n = len(ids)
    if n <= pc.capacity:
        return list(range(n))
    rows = [n - 1] + [n + t - 1 for t in range(1, len(look))]
    a = hf_attentions(ref, ids + look[:-1])[:, :, rows, :n]
    s = (a / a.sum(-1, keepdims=True)).max((0, 1)).mean(0)
    c = pc.chunk_size
    chunk = [s[i: i + c].mean() for i in range(0, n, c)]
    return top([np.inf if j >= n - pc.window_size else chunk[j // c] for j in range(n)], pc.capacity)


def np_draft_ppl(ref, ids, pc: DraftPPL):
    n = len(ids)
    if n <= pc.capacity:
        return list(range(n))
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([ids])).logits[0], -1).numpy()
    s = [np.inf] + [-logp[j - 1, ids[j]] for j in range(1, n)]
    return top([np.inf if j >= n - pc.window_size else s[j] for j in range(n)], pc.capacity)


SPECPC_CASES = [
    SpecPC(capacity=C, window_size=W, kernel_size=5, starting_layer_index=1),  # the paper's shape: T = 1
    SpecPC(capacity=C, window_size=W, kernel_size=4, neighbor_tokens=3, pool_type="mean", reduction_type="mean",
           lookahead_tokens=4, starting_layer_index=0, weighted_query=False),
    SpecPC(capacity=C, window_size=W, kernel_size=3, neighbor_tokens=0, lookahead_tokens=5, starting_layer_index=0),
    SpecPC(capacity=24, window_size=8, kernel_size=8, lookahead_tokens=3, starting_layer_index=1),
]


@pytest.mark.parametrize("pc", SPECPC_CASES, ids=range(len(SPECPC_CASES)))
def test_specpc_matches_the_numpy_reference(draft, prompts, pc):
    model, ref = draft
    c = compress(prompts, pc, draft=model)
    for b, ids in enumerate(prompts):
        if len(ids) > pc.capacity:
            assert c.lookahead[b] == hf_greedy(ref, ids, pc.steps)
        assert c.kept[b] == np_specpc(ref, ids, c.lookahead[b], pc), b
        assert c.prompts[b] == [ids[i] for i in c.kept[b]]


def test_specpc_lookahead_stops_at_a_stop_id(draft, prompts):
    model, ref = draft
    pc = SPECPC_CASES[1]  # 4 lookahead tokens
    free = {b: hf_greedy(ref, prompts[b], 4) for b in (0, 2)}
    b, i = next((b, i) for b in (0, 2) for i in (1, 2) if free[b][i] not in free[b][:i])
    c = compress(prompts, pc, draft=model, stop_ids=[free[b][i]])
    assert c.lookahead[b] == free[b][: i + 1]  # the stop id stays in the lookahead; fewer decode queries
    assert c.kept[b] == np_specpc(ref, prompts[b], c.lookahead[b], pc)


def test_baselines_match_their_references(draft, prompts):
    model, ref = draft
    sp = SpecPrefill(capacity=C, window_size=2, lookahead_tokens=3, chunk_size=5)
    c = compress(prompts, sp, draft=model)
    assert [c.kept[b] for b in range(3)] == [np_specprefill(ref, p, c.lookahead[b], sp) for b, p in enumerate(prompts)]
    ppl = DraftPPL(capacity=C, window_size=W)
    assert compress(prompts, ppl, draft=model).kept == [np_draft_ppl(ref, p, ppl) for p in prompts]
    assert compress(prompts, Recency(capacity=C)).kept == [list(range(max(0, n - C), n)) for n in LENGTHS]


def small(name):
    """Registry method ``name`` sized for the tiny models."""
    kw = {"capacity": C} | ({} if name == "recency" else {"window_size": W})
    return make_method(name, **kw, **({"kernel_size": 5, "starting_layer_index": 1} if name == "specpc" else {}))


@pytest.mark.parametrize("name", list(METHODS))
def test_exactly_capacity_in_order_window_kept_short_rows_unchanged(draft, prompts, name):
    model, _ = draft
    pc = small(name)
    c = compress(prompts, pc, draft=model if pc.needs_draft else None)
    assert c.compressed == [True, False, True]
    for b, n in enumerate(LENGTHS):
        kept = c.kept[b]
        assert len(kept) == min(n, C) and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] == n - 1
        assert set(range(n - W, n)) <= set(kept)
    assert c.prompts[1] == prompts[1] and c.kept[1] == list(range(LENGTHS[1]))


@pytest.mark.parametrize("name", list(METHODS))
def test_batch_rows_are_independent(draft, prompts, name):
    model, _ = draft
    pc = small(name)
    dm = model if pc.needs_draft else None
    together = compress(prompts, pc, draft=dm)  # padded to 64
    for b, p in enumerate(prompts):
        alone = compress([p], pc, draft=dm)  # padded to its own bucket
        assert alone.kept[0] == together.kept[b]
        if together.lookahead is not None and alone.lookahead is not None:
            assert alone.lookahead[0] == together.lookahead[b]


def test_random_is_seeded(prompts):
    a, b, c = (compress(prompts, Random(capacity=C, window_size=W, seed=s)).kept for s in (0, 0, 1))
    assert a == b and a != c


def test_short_prompts_come_back_unchanged(draft, prompts):
    model, _ = draft
    c = compress(prompts, SpecPC(capacity=64, window_size=W, starting_layer_index=0), draft=model)
    assert c.prompts == prompts and not any(c.compressed) and c.lookahead is None and c.timings["draft"] == 0
    shorter_than_window = [5, 6, 7]  # the reference crashes here
    c = compress([prompts[0], shorter_than_window], small("specpc"), draft=model)
    assert c.compressed == [True, False] and c.prompts[1] == shorter_than_window and len(c.kept[0]) == C


@pytest.mark.parametrize("make,match", [
    (lambda: SpecPC(capacity=8, window_size=16), "must be >= window_size"),
    (lambda: SpecPC(pool_type="sum"), "pool_type"),
    (lambda: SpecPrefill(chunk_size=0), "chunk_size"),
    (lambda: make_method("nope"), "unknown pc method"),
    (lambda: make_method("recency", window_size=3), "no parameter window_size"),
])
def test_bad_configs_are_refused(make, match):
    with pytest.raises(InputError, match=match):
        make()


def test_draft_errors(draft, target, prompts):
    model, _ = draft
    with pytest.raises(InputError, match="starting_layer_index"):
        compress(prompts, SpecPC(capacity=C, window_size=W, starting_layer_index=2), draft=model)
    with pytest.raises(InputError, match="needs a draft"):
        compress(prompts, SpecPC(capacity=C, window_size=W))
    with pytest.raises(InputError, match="keeps the original positions"):
        jaxspec.generate(target, prompts, pc=SpecPrefill(capacity=C), kv="snapkv", draft=model)


def test_generate_with_pc_is_generation_on_the_compressed_prompt(draft, target, prompts):
    model, _ = draft
    pc = SpecPC(capacity=C, window_size=W, kernel_size=5, starting_layer_index=1)
    res = jaxspec.generate(target, prompts, max_new_tokens=6, stop_ids=[], pc=pc, draft=model, kept_indices=True)
    c = compress(prompts, pc, draft=model)
    base = jaxspec.generate(target, c.prompts, max_new_tokens=6, stop_ids=[])
    assert [r.token_ids for r in res] == [r.token_ids for r in base]
    assert [r.pc["kept_indices"] for r in res] == c.kept
    assert [(r.pc["tokens_in"], r.pc["tokens_out"]) for r in res] == [(40, C), (12, 12), (57, C)]
    assert "note" in res[1].pc and res[0].pc["positions"] == "renumbered" and res[0].timings["pc_draft"] > 0


def test_speckv_pc_reuses_the_drafts_lookahead(draft, target, prompts):
    model, _ = draft
    pc = SpecPC(capacity=24, window_size=W, kernel_size=5, lookahead_tokens=4, starting_layer_index=0)
    kv = SpecKV(capacity=12, window_size=W, kernel_size=3)
    res = jaxspec.generate(target, prompts, max_new_tokens=5, stop_ids=[], pc=pc, kv=kv, draft=model)
    c = compress(prompts, pc, draft=model)
    for b, r in enumerate(res):
        assert r.timings["draft"] == 0  # SpecKV wrote no lookahead of its own
        assert r.pc["lookahead_tokens"] == len(c.lookahead[b]) == 4
        assert r.kv["lookahead_tokens"] == 4 and r.kv["prompt_tokens"] == len(c.prompts[b])
    from jaxspec.kv.pipeline import generate as kv_generate

    again = kv_generate(target, c.prompts, kv, draft=model, lookahead=c.lookahead, max_new_tokens=5)
    assert [r.token_ids for r in res] == [r.token_ids for r in again]


def test_specprefill_keeps_original_positions(draft, target, tiny_hf, prompts):
    model, _ = draft
    pc = SpecPrefill(capacity=C, lookahead_tokens=3, chunk_size=4)
    res = jaxspec.generate(target, prompts, max_new_tokens=3, stop_ids=[], pc=pc, draft=model, kept_indices=True)
    _, hf_target = tiny_hf("llama-gqa4to2-untied-llama3rope")
    for b, r in enumerate(res):
        kept = r.pc["kept_indices"]
        ids, pos = [prompts[b][i] for i in kept], list(kept)
        for t in r.token_ids:  # greedy, at the original positions, continuing from position n
            with torch.no_grad():
                logits = hf_target(torch.tensor([ids]), position_ids=torch.tensor([pos])).logits[0, -1]
            assert int(logits.argmax()) == t
            ids, pos = ids + [t], pos + [LENGTHS[b] + len(pos) - len(kept)]
    assert res[0].pc["positions"] == "original"


def test_cli_generate_and_compress_prompt(draft, tiny_hf, capsys):
    d, _ = tiny_hf("qwen2-bias")
    ids = ",".join(map(str, range(3, 43)))
    assert main(["generate", "--model", str(d), "--prompt-ids", ids, "--max-new-tokens", "3", "--stop-ids", "",
                 "--pc", "recency", "--pc-capacity", str(C), "--kept-indices", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pc"]["kept_indices"] == list(range(40 - C, 40)) and out["prompt_tokens"] == C
    assert main(["compress-prompt", "--model", str(d), "--prompt-ids", ids, "--pc", "specpc", "--pc-capacity",
                 str(C), "--pc-window-size", str(W), "--pc-kernel-size", "5", "--pc-starting-layer-index", "1",
                 "--pc-weighted-query", "false", "--kept-indices", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == C and out["pc"]["params"]["weighted_query"] is False
    assert out["token_ids"] == [3 + i for i in out["pc"]["kept_indices"]]
    assert main(["generate", "--model", str(d), "--prompt-ids", ids, "--pc", "specpc"]) == 2
    assert "needs a draft" in capsys.readouterr().err
    assert main(["generate", "--model", str(d), "--prompt-ids", ids, "--pc-capacity", "8"]) == 2
    assert "needs --pc" in capsys.readouterr().err


@pytest.mark.real
def test_real_needle_survives_specpc(capsys):
    """Qwen2.5-Coder 0.5B draft -> 1.5B target, a ~2K-token needle prompt, capacity 256 (kernel 32, the paper's
    SpecKV-PC setting): the needle's sentence is in the compressed prompt and the target answers from it."""
    from experiments.bench_kv import ANSWER, NEEDLE, needle_prompt

    target = jaxspec.load("qwen2.5-coder-1.5b-instruct", quiet=True)
    draft = jaxspec.load("qwen2.5-coder-0.5b-instruct", quiet=True)
    prompt = needle_prompt(target.tokenizer, 2000)
    pc = SpecPC(capacity=256, kernel_size=32)
    c = compress([prompt], pc, draft=draft)
    assert len(c.prompts[0]) == 256 and NEEDLE in target.tokenizer.decode(c.prompts[0])
    r = jaxspec.generate(target, prompt, max_new_tokens=12, pc=pc, draft=draft)
    with capsys.disabled():
        print(f"\nspecpc: {len(prompt)} -> 256 tokens, draft {r.pc['draft_seconds']:.2f}s, answer {r.text!r}")
    assert ANSWER in r.text
