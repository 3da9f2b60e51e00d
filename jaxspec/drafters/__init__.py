"""Drafters for speculative decoding, and their registry.

A drafter is a frozen (hashable) dataclass: it is a static argument of the jitted speculative loop, so every
method below is traced inside that loop and must keep static shapes. Arrays it needs (a draft model's
weights, a table) travel separately as ``dparams``, returned by ``prepare``.

Protocol (see ``jaxspec.speculative`` for the loop that calls it):

``tree_size: int``
    T, the static number of tree nodes including the root.
``prepare(draft_model) -> (drafter, dparams)``
    Host side, once per request: bind what the drafter needs (e.g. the draft model's config and params).
``check(model)`` (optional)
    Host side, once per request: raise ValueError when the drafter cannot serve this target (ADED: a table
    built for another vocabulary).
``init(dparams, prompt_tokens, prompt_lengths, capacity) -> state``
    After the target's prefill: the drafter's loop state (a pytree), e.g. a prefilled draft KV cache.
``propose(dparams, state, hist, hist_len, live, rng, sampling) -> (Proposal, state)``
    ``hist [B, H]`` holds prompt + emitted tokens, ``hist_len [B]`` their count; the root (the last emitted
    token, not yet verified-in-cache) is ``hist[b, hist_len - 1]``. ``live [B]``: rows still generating.
``update(dparams, state, proposal, base, keep) -> state``
    After verification: the target cache now holds ``keep[b]`` nodes of the accepted path (root first,
    ``keep = 0`` for rows that did not run) at slots from ``base[b]``.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax

from jaxspec.tree import Tree


@flax.struct.dataclass
class Proposal:
    """A drafted tree plus, for stochastic drafters, ``q [B, T, V]``: the distribution each node's token was
    drawn from (None: deterministic drafts). Node 0's token is ignored (the loop puts the root there)."""

    tree: Tree
    q: jax.Array | None = None


def _registry():
    from jaxspec.drafters.aded import ADED
    from jaxspec.drafters.draft_model import DraftModel
    from jaxspec.drafters.ngram import NGram

    return {"aded": ADED, "ngram": NGram, "draft-model": DraftModel}


def make_drafter(name: str, tree_size: int | None = None, **options):
    """Build a registered drafter by name ("aded", "ngram", "draft-model") with its dataclass options.

    ``tree_size`` (the CLI's ``--tree-size``) is the number of verified tokens per step, root included: the
    chain drafters get ``k = tree_size - 1`` draft tokens, ADED a node budget of ``tree_size - 1``. ADED
    needs ``table``: a ``TrigramTable`` or the path of one saved by ``jaxspec trigram build``.
    """
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown drafter {name!r}; choose from {sorted(registry)}")
    if tree_size is not None:
        if tree_size < 2:
            raise ValueError(f"tree_size must be >= 2 (the root and a draft), got {tree_size}")
        options["budget" if name == "aded" else "k"] = tree_size - 1
    if name == "aded":
        from jaxspec.drafters.trigram import TrigramTable

        if options.get("table") is None:
            raise ValueError("the aded drafter needs a tri-gram table (table=TrigramTable or a path; CLI: --trigram)")
        if not isinstance(options["table"], TrigramTable):
            options["table"] = TrigramTable.load(options["table"])
    return registry[name](**options)


def describe() -> list[dict]:
    """Every drafter: name, summary, whether it needs ``--draft``, and its scalar options with defaults
    (bound objects such as ADED's table or a draft model's config are left out: the CLI supplies them)."""
    out = []
    for name, cls in _registry().items():
        params = {f.name: f.default for f in dataclasses.fields(cls)
                  if isinstance(f.default, (bool, int, float, str))}
        out.append({"name": name, "summary": cls.summary, "needs_draft": cls.needs_draft,
                    "params": params})
    return out


__all__ = ["Proposal", "describe", "make_drafter"]
