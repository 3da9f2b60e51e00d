"""ADED (Adaptix) drafter: an adaptive tri-gram table searched by MCTS drafts a token tree every step.

Per step and per live row (``../shared/research/aded.md`` §2.3, §3, §4):

1. **Adapt** (``adapt=True``): every trigram of the last 16 tokens (prompt + output, the root included) gains
   +0.04 in the table, capped at 3.0. The table object is mutated, so the adaptation persists across prompts
   for as long as the table lives (the reference keeps its Reader across a whole evaluation run).
2. **Search**: ``iterations`` rounds of PUCT selection, expansion of *all* successors of the reached node
   (then moving to the last one), a rollout that samples successors in proportion to their weights, and a
   backup of the trajectory value, over the tri-gram graph from the root context ``(s[-2], s[-1])``.
   Trajectories hold at most ``depth`` words counting the root, so the search tree is ``depth - 1`` deep.
   ``value="released"`` reproduces the reference code, whose value sums ``w(a, b, b)`` (a lookup bug) and is
   therefore 1.0 almost always: visits then follow the trigram prior. ``value="intended"`` sums the true
   weights ``w(a, b, c)`` along the trajectory.
3. **Extract**: every search node is a candidate path scored by its visits; keep the ``top_paths`` best (a
   stable sort over depth-first order, the root one of them), extend each non-root path by the argmax
   successor of its last two tokens, drop the root, dedupe.
4. **Budget**: the reference's ``cut_to_choices`` (drop the paths with the most distinct tokens first while
   their distinct-token sum exceeds ``budget``), then the prefix closure of the paths as nodes identified by
   per-depth first-appearance indices, sorted by (depth, lexicographic) and cut to ``budget`` nodes — that
   cut keeps parents before children, so the tree stays prefix-closed.

The search is pointer chasing over a sparse table, so it runs on the host in plain Python, called from the
jitted loop through ``jax.experimental.io_callback``: the adaptation is a side effect that must happen exactly
once per live row and step, which ``pure_callback`` (free to drop or repeat calls) does not promise. Only the
last 16 tokens per row, the live mask and one int32 seed per row go in, and the ``[B, T]`` tree buffers come
out. Rollouts draw from ``numpy`` generators seeded by ``(seed, per-row seed from the loop's key)``, so the
trees depend only on the table, the history and the seeds.

Deliberate deviations from the reference, all documented in README.md:

* successors are ordered by weight (descending, then id) instead of Rust ``HashMap`` order, which makes the
  search deterministic (the reference's order is randomly seeded per process);
* path dedupe keeps first-occurrence (visit) order instead of a hash set's, and ``cut_to_choices`` breaks
  ties toward dropping the later (less visited) path;
* the node cap is ``budget`` (the reference hard-codes 64) so that small trees can be swept;
* an empty draft (unknown root context) is a root-only tree, not the reference's dummy token 100;
* batch > 1: rows adapt and search one after another in row order, against the one shared table;
* sampling is lossless tree speculative sampling (``jaxspec.tree.sample_accept``), not the reference's
  REST "nucleus posterior", which is biased.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxspec.drafters import Proposal
from jaxspec.drafters.trigram import WINDOW, TrigramTable
from jaxspec.speculative import HOST_DRAFT_TIMER
from jaxspec.tree import Tree

VALUE_MODES = ("released", "intended")


@dataclasses.dataclass(frozen=True)
class SearchTree:
    """The MCTS tree as parallel lists (node 0 is the root; a node's children are contiguous, in row order)."""

    token: list[int]
    prev: list[int]  # the token before ``token``: a node's word (state) is (prev, token)
    parent: list[int]
    first_child: list[int]  # -1 while unexpanded
    num_children: list[int]
    visits: list[int]
    value: list[float]  # W, the summed backed-up values
    prior: list[float]  # P, the raw (unnormalised) trigram weight of the node's token


def mcts(table: TrigramTable, prev: int, root: int, *, iterations: int, c1: float, c2: float, depth: int,
         intended: bool, rng: np.random.Generator) -> SearchTree:
    """ADED's search from the root context ``(prev, root)`` (aded.md §3.2), in plain Python.

    Rows are fetched once per search (a dict cache), children are created with list ``extend``s, and the
    rollout uniforms are drawn in one numpy call: a search of 150 iterations then costs a few milliseconds.
    """
    rows: dict[tuple[int, int], tuple[list[int], list[float]]] = {}

    def row(a, b):
        r = rows.get((a, b))
        if r is None:
            r = rows[a, b] = table.successors(a, b)
        return r

    def weight(a, b, c):
        succ, w = row(a, b)
        return w[succ.index(c)] if c in succ else 0.0

    token, prv, parent, first, count, N, W, P = [root], [prev], [-1], [-1], [0], [0], [0.0], [0.0]
    if not row(prev, root)[0]:  # unknown root context: nothing to search (every iteration would back up 1.0)
        return SearchTree(token, prv, parent, first, count, N, W, P)
    uniforms = rng.random(iterations * depth).tolist()
    u = 0
    log, sqrt = math.log, math.sqrt
    for _ in range(iterations):
        n, traj = 0, [prev, root]  # the trajectory as tokens: word k is (traj[k], traj[k + 1])
        while count[n] and len(traj) - 1 < depth:  # selection: PUCT, first maximum wins, unvisited = +inf
            s = first[n]
            f = (c1 + log((N[n] + c2 + 1) / c2)) * sqrt(N[n])
            best, best_score = s, -math.inf
            for j in range(s, s + count[n]):
                nj = N[j]
                if nj == 0:
                    best = j
                    break
                score = W[j] / nj + f * P[j] / (1 + nj)
                if score > best_score:
                    best, best_score = j, score
            n = best
            traj.append(token[n])
        if len(traj) - 1 < depth:  # expansion: all successors at once, then go to the last child
            succ, w = row(prv[n], token[n])
            if succ:
                k, t = len(succ), token[n]
                first[n], count[n] = len(token), k
                token += succ
                prv += [t] * k
                parent += [n] * k
                first += [-1] * k
                count += [0] * k
                N += [0] * k
                W += [0.0] * k
                P += w
                n = len(token) - 1
                traj.append(token[n])
        while len(traj) - 1 < depth:  # rollout: successors sampled in proportion to their weights
            succ, w = row(traj[-2], traj[-1])
            if not succ:
                break
            x = uniforms[u] * sum(w)
            u += 1
            pick = succ[-1]
            for c, wc in zip(succ, w):
                x -= wc
                if x < 0:
                    pick = c
                    break
            traj.append(pick)
        v = 1.0
        for i in range(len(traj) - 2):  # the reference reads w(a, b, b): the "released" value bug
            v += weight(traj[i], traj[i + 1], traj[i + 2] if intended else traj[i + 1])
        while n >= 0:
            N[n] += 1
            W[n] += v
            n = parent[n]
    return SearchTree(token, prv, parent, first, count, N, W, P)


def candidate_paths(table: TrigramTable, tree: SearchTree, top_paths: int) -> list[tuple[int, ...]]:
    """aded.md §3.3: the ``top_paths`` most visited nodes (stable over depth-first order) as token paths below
    the root, each extended by its context's argmax successor; the root's (empty) path dropped; deduped in
    order."""
    def dfs(visited_only):
        order, stack = [], [0]
        while stack:
            n = stack.pop()
            order.append(n)
            s = tree.first_child[n]
            if s >= 0:
                stack += [j for j in range(s + tree.num_children[n] - 1, s - 1, -1)
                          if tree.visits[j] or not visited_only]
        return order

    order = dfs(True)  # unvisited nodes rank below every visited one: only needed when too few were visited
    if len(order) < top_paths:
        order = dfs(False)
    ranked = sorted(order, key=tree.visits.__getitem__, reverse=True)[:top_paths]  # stable: ties keep DFS order
    paths = {}
    for n in ranked:
        path = []
        m = n
        while m > 0:
            path.append(tree.token[m])
            m = tree.parent[m]
        if not path:
            continue
        succ, _ = table.successors(tree.prev[n], tree.token[n])
        path = path[::-1] + succ[:1]
        paths.setdefault(tuple(path), None)
    return list(paths)


def cut_to_choices(paths: list[tuple[int, ...]], choices: int) -> list[tuple[int, ...]]:
    """REST/ADED's budget cut: while the paths' distinct-token counts sum past ``choices``, drop the path with
    the largest count (ties: the later, less visited path first)."""
    counts = [len(set(p)) for p in paths]
    total = sum(counts)
    dropped = set()
    for i in sorted(range(len(paths)), key=lambda i: (-counts[i], -i)):
        if total <= choices:
            break
        total -= counts[i]
        dropped.add(i)
    return [p for i, p in enumerate(paths) if i not in dropped]


def assemble(paths: list[tuple[int, ...]], budget: int) -> tuple[list[int], list[int]]:
    """aded.md §4: the prefix closure of ``paths`` as tree nodes, at most ``budget`` of them.

    A node is the tuple of per-depth indices of its tokens (each depth's distinct tokens in order of first
    appearance); nodes are sorted by (depth, lexicographic) and the first ``budget`` kept, which keeps every
    kept node's parent (it is shallower). Returns the nodes' tokens and parents, node ``i`` of the lists being
    tree node ``i + 1`` and parent 0 the root.
    """
    levels: list[dict[int, int]] = []
    for p in paths:
        for d, t in enumerate(p):
            if d == len(levels):
                levels.append({})
            levels[d].setdefault(t, len(levels[d]))
    nodes = set()
    for p in paths:
        idx = tuple(levels[d][t] for d, t in enumerate(p))
        nodes.update(idx[:k] for k in range(1, len(idx) + 1))
    kept = sorted(nodes, key=lambda n: (len(n), n))[:budget]
    where = {n: i + 1 for i, n in enumerate(kept)}
    by_index = [list(level) for level in levels]
    return ([by_index[len(n) - 1][n[-1]] for n in kept], [where.get(n[:-1], 0) for n in kept])


@dataclasses.dataclass(frozen=True)
class ADED:
    """ADED drafter over ``table`` (a ``TrigramTable`` built with the target's tokenizer).

    Hashable, as a static argument of the jitted loop must be: the table hashes and compares by identity, so
    another table is another compiled program (whose host callback reads that table). ``budget`` is the node
    cap below the root (``tree_size = budget + 1``); the other fields are the reference's defaults.
    """

    summary: ClassVar[str] = "adaptive tri-gram table + MCTS draft tree (needs --trigram); budget = --tree-size - 1"
    needs_draft: ClassVar[bool] = False  # does it take a draft model (--draft)?

    table: TrigramTable
    iterations: int = 150
    c1: float = 32.0
    c2: float = 8.0
    depth: int = 4
    top_paths: int = 24
    budget: int = 64
    value: str = "released"
    adapt: bool = True
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.table, TrigramTable):
            raise ValueError(f"ADED needs a TrigramTable (table=...), got {type(self.table).__name__}")
        if self.value not in VALUE_MODES:
            raise ValueError(f"value must be one of {VALUE_MODES}, got {self.value!r}")
        if not (self.iterations >= 1 and self.depth >= 2 and self.top_paths >= 1 and self.budget >= 1
                and self.c2 > 0):
            raise ValueError(f"need iterations >= 1, depth >= 2, top_paths >= 1, budget >= 1, c2 > 0; got {self}")

    @property
    def tree_size(self) -> int:
        return self.budget + 1

    def check(self, model) -> None:
        """Refuse a target whose ids the table does not speak (a table built with another tokenizer)."""
        if self.table.vocab_size != model.config.vocab_size:
            raise ValueError(f"the tri-gram table was built for a vocabulary of {self.table.vocab_size} ids, the "
                             f"target has {model.config.vocab_size}: build it with the target's tokenizer "
                             "(jaxspec trigram build --model TARGET ...)")

    def prepare(self, draft_model):
        return self, None

    def init(self, dparams, prompt_tokens, prompt_lengths, capacity):
        return None

    def search(self, prev: int, root: int, seed: int = 0) -> SearchTree:
        """The MCTS for one root context; ``seed`` is the per-row seed (combined with ``self.seed``)."""
        return mcts(self.table, prev, root, iterations=self.iterations, c1=self.c1, c2=self.c2, depth=self.depth,
                    intended=self.value == "intended", rng=np.random.default_rng([self.seed, seed]))

    def draft(self, prev: int, root: int, seed: int = 0) -> tuple[list[int], list[int]]:
        """One row's tree below the root (no adaptation): ``(tokens, parents)`` of nodes 1.., parent 0 = root."""
        paths = candidate_paths(self.table, self.search(prev, root, seed), self.top_paths)
        return assemble(cut_to_choices(paths, self.budget), self.budget)

    def _host_propose(self, tail, live, seeds):
        """io_callback body: adapt, search and assemble per live row. ``tail [B, 16]``: the last tokens of
        each row, -1 before the row's start."""
        t0 = time.perf_counter()
        tail, live, seeds = np.asarray(tail), np.asarray(live), np.asarray(seeds)  # jax arrays: no jax ops here
        B, T = tail.shape[0], self.tree_size
        tokens = np.zeros((B, T), np.int32)
        parent = np.zeros((B, T), np.int32)
        parent[:, 0] = -1
        valid = np.zeros((B, T), bool)
        valid[:, 0] = True
        for b in np.flatnonzero(live):
            seq = [int(t) for t in tail[b] if t >= 0]
            if self.adapt:
                self.table.update(seq)
            toks, pars = self.draft(seq[-2], seq[-1], int(seeds[b]))
            n = len(toks) + 1
            tokens[b, 1:n], parent[b, 1:n], valid[b, :n] = toks, pars, True
        HOST_DRAFT_TIMER.add(time.perf_counter() - t0, int(live.sum()))
        return tokens, parent, valid

    def propose(self, dparams, state, hist, hist_len, live, rng, sampling):
        B, H = hist.shape
        src = hist_len[:, None] - WINDOW + jnp.arange(WINDOW)
        tail = jnp.where(src >= 0, jnp.take_along_axis(hist, jnp.clip(src, 0, H - 1), axis=1), -1).astype(jnp.int32)
        seeds = jax.random.randint(rng, (B,), 0, np.iinfo(np.int32).max, dtype=jnp.int32)
        shape = (B, self.tree_size)
        tokens, parent, valid = io_callback(
            self._host_propose, (jax.ShapeDtypeStruct(shape, jnp.int32), jax.ShapeDtypeStruct(shape, jnp.int32),
                                 jax.ShapeDtypeStruct(shape, jnp.bool_)), tail, live, seeds)
        return Proposal(Tree(tokens, parent, valid)), state

    def update(self, dparams, state, proposal, base, keep):
        return state  # the table learns from the accepted tokens at the next step's adaptation, as in the reference
