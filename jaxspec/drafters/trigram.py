"""ADED's sparse tri-gram table ("LLM representative"): for a context of two tokens (a, b), the weights of
its successors c, approximating the target model's next-token distribution.

Layout (host side, numpy): ``keys [n_ctx]`` int64, sorted, ``a * vocab_size + b`` (int64 so vocabularies of
65,536 tokens and more do not overflow); ``succ [n_ctx, K]`` int32 successor ids (-1 padding) and
``weight [n_ctx, K]`` float32, each row sorted by weight (descending, then id). Built from a corpus tokenised
with the target's tokenizer: ``weight = count(a, b, c) / count(a, b, ·)``, keeping the top ``K = 12`` per
context without renormalising (the reference prunes at load time; the result is the same).

Adaptive update (ADED §2.3), once per decoding step on the last 16 tokens of the sequence: every trigram
there gains ``+0.04``, capped at ``3.0``, creating the entry at 0 if missing. Updated entries live in an
overlay (a dict) that overrides the base weight; rows can therefore grow past K, as in the reference. The
overlay persists across prompts for as long as the table object lives, and ``save`` writes it too. Files are
``.npz`` archives of plain arrays (loaded with ``allow_pickle=False``), written to a temporary name and
renamed so a crash never leaves a half-written table.
"""

from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

TOP_K = 12
WINDOW, STEP, CAP = 16, 0.04, 3.0
ARRAYS = ("vocab_size", "keys", "succ", "weight", "overlay_key", "overlay_succ", "overlay_weight")


class TrigramTableError(ValueError):
    """A file that is not a valid tri-gram table (not an .npz, arrays missing or of the wrong shape)."""


class TrigramTable:
    def __init__(self, vocab_size: int, keys, succ, weight, overlay: dict[int, dict[int, float]] | None = None):
        self.vocab_size = int(vocab_size)
        self.keys = np.asarray(keys, np.int64)
        self.succ = np.asarray(succ, np.int32)
        self.weight = np.asarray(weight, np.float32)
        self.overlay = overlay if overlay is not None else {}  # context key -> {successor: weight}

    @classmethod
    def build(cls, texts: Iterable[Sequence[int]], vocab_size: int, top_k: int = TOP_K) -> "TrigramTable":
        """Count the trigrams of every token sequence (sequences shorter than 3 tokens add nothing)."""
        ctx_parts, nxt_parts = [], []
        for t in texts:
            t = np.asarray(t, np.int64)
            if t.size >= 3:
                ctx_parts.append(t[:-2] * vocab_size + t[1:-1])
                nxt_parts.append(t[2:])
        if not ctx_parts:
            return cls(vocab_size, np.zeros(0), np.zeros((0, top_k)), np.zeros((0, top_k)))
        ctx, nxt = np.concatenate(ctx_parts), np.concatenate(nxt_parts)
        order = np.lexsort((nxt, ctx))
        ctx, nxt = ctx[order], nxt[order]
        new = np.ones(ctx.size, bool)
        new[1:] = (ctx[1:] != ctx[:-1]) | (nxt[1:] != nxt[:-1])
        starts = np.flatnonzero(new)
        pair_ctx, pair_nxt = ctx[starts], nxt[starts]
        count = np.diff(np.append(starts, ctx.size))
        keys, group, per_ctx = np.unique(pair_ctx, return_inverse=True, return_counts=True)
        total = np.bincount(group, weights=count)
        by_weight = np.lexsort((pair_nxt, -count, group))
        rank = np.arange(by_weight.size) - np.repeat(np.cumsum(per_ctx) - per_ctx, per_ctx)
        kept = by_weight[rank < top_k]
        succ = np.full((keys.size, top_k), -1, np.int32)
        weight = np.zeros((keys.size, top_k), np.float32)
        succ[group[kept], rank[rank < top_k]] = pair_nxt[kept]
        weight[group[kept], rank[rank < top_k]] = count[kept] / total[group[kept]]
        return cls(vocab_size, keys, succ, weight)

    def key(self, a: int, b: int) -> int:
        return int(a) * self.vocab_size + int(b)

    def _index(self, key: int) -> int:
        i = int(np.searchsorted(self.keys, key))
        return i if i < self.keys.size and self.keys[i] == key else -1

    def successors(self, a: int, b: int) -> tuple[list[int], list[float]]:
        """Successors of context (a, b) and their current weights as Python lists, by weight (descending, then
        id). The MCTS calls this hundreds of times per step, so a context without overlay entries costs one
        ``searchsorted`` and two row slices, with no re-sorting."""
        key = int(a) * self.vocab_size + int(b)
        i = int(self.keys.searchsorted(key))
        if i < self.keys.size and self.keys[i] == key:
            succ = self.succ[i].tolist()
            n = succ.index(-1) if succ[-1] < 0 else len(succ)
            succ, weight = succ[:n], self.weight[i, :n].tolist()
        else:
            succ, weight = [], []
        extra = self.overlay.get(key)
        if not extra:
            return succ, weight
        entries = dict(zip(succ, weight))
        entries.update(extra)
        items = sorted(entries.items(), key=lambda kv: (-kv[1], kv[0]))
        return [c for c, _ in items], [w for _, w in items]

    def row(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Successors of context (a, b) and their current weights, by weight (descending, then id)."""
        succ, weight = self.successors(a, b)
        return np.array(succ, np.int32), np.array(weight, np.float32)

    def weight_of(self, a: int, b: int, c: int) -> float:
        key = self.key(a, b)
        if c in self.overlay.get(key, {}):
            return self.overlay[key][c]
        i = self._index(key)
        hit = np.flatnonzero(self.succ[i] == c) if i >= 0 else []
        return float(self.weight[i, hit[0]]) if len(hit) else 0.0

    def update(self, seq: Sequence[int], window: int = WINDOW, step: float = STEP, cap: float = CAP) -> None:
        """ADED's adaptive update: ``+step`` (capped at ``cap``) for each trigram of the last ``window`` tokens."""
        tail = [int(x) for x in seq[-window:]]
        for a, b, c in zip(tail, tail[1:], tail[2:]):
            w = min(self.weight_of(a, b, c) + step, cap)
            self.overlay.setdefault(self.key(a, b), {})[c] = float(np.float32(w))

    def save(self, path: str | os.PathLike) -> None:
        """Write the table (base and overlay) to ``path`` exactly (no ``.npz`` suffix is added), atomically."""
        path = Path(path)
        ok = [(k, c, w) for k, row in self.overlay.items() for c, w in row.items()]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same directory: the rename is atomic
        try:
            with open(tmp, "wb") as f:
                np.savez(f, vocab_size=np.int64(self.vocab_size), keys=self.keys, succ=self.succ,
                         weight=self.weight, overlay_key=np.array([k for k, _, _ in ok], np.int64),
                         overlay_succ=np.array([c for _, c, _ in ok], np.int32),
                         overlay_weight=np.array([w for _, _, w in ok], np.float32))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrigramTable":
        """Read a table written by ``save``. Raises FileNotFoundError, or TrigramTableError for anything else
        that is not a well-formed table."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such tri-gram table file: {path}")
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise TrigramTableError(f"{path}: not a tri-gram table (a single .npy array, not an .npz archive)")
            with data:
                missing = [k for k in ARRAYS if k not in data.files]
                if missing:
                    raise TrigramTableError(f"{path}: not a tri-gram table (arrays missing: {', '.join(missing)})")
                a = {k: data[k] for k in ARRAYS}
        except TrigramTableError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise TrigramTableError(f"{path}: not a readable tri-gram table (.npz): {e}") from e
        keys, succ, weight = a["keys"], a["succ"], a["weight"]
        ok = (a["vocab_size"].shape == () and int(a["vocab_size"]) > 0 and keys.ndim == 1 and keys.dtype == np.int64
              and succ.ndim == 2 and succ.shape == weight.shape and succ.shape[0] == keys.size
              and succ.dtype == np.int32 and weight.dtype == np.float32 and bool(np.all(np.diff(keys) > 0))
              and a["overlay_key"].shape == a["overlay_succ"].shape == a["overlay_weight"].shape)
        if not ok:
            raise TrigramTableError(f"{path}: malformed tri-gram table (array shapes, dtypes or key order)")
        overlay: dict[int, dict[int, float]] = {}
        for k, c, w in zip(a["overlay_key"].tolist(), a["overlay_succ"].tolist(), a["overlay_weight"].tolist()):
            overlay.setdefault(k, {})[c] = w
        return cls(int(a["vocab_size"]), keys, succ, weight, overlay)


def build_from_files(files: Sequence[str | os.PathLike], tokenizer, vocab_size: int, top_k: int = TOP_K,
                     progress: bool = False) -> tuple[TrigramTable, dict]:
    """A table from text files tokenised with ``tokenizer`` (the target's: ids must mean what the target means).

    Each file is one text, as in the reference (every text is tokenised on its own, BOS included when the
    tokenizer adds one). Files that are not UTF-8 are skipped and counted: decoding them with replacement
    characters would invent token sequences no model produces. Returns the table and a summary
    (files, skipped, tokens, contexts, seconds).
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    texts, skipped = [], 0
    for path in tqdm(files, desc="tokenising", unit="file", disable=not progress):
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        ids = tokenizer.encode(text)
        if ids and max(ids) >= vocab_size:
            raise TrigramTableError(f"{path}: token id {max(ids)} outside the vocabulary ({vocab_size} ids)")
        texts.append(np.asarray(ids, np.int32))  # 4 bytes a token, not a Python int each (large corpora)
    table = TrigramTable.build(texts, vocab_size, top_k)
    summary = {"files": len(texts), "skipped": skipped, "tokens": sum(len(t) for t in texts),
               "contexts": int(table.keys.size), "seconds": time.perf_counter() - t0}
    return table, summary
