"""RULER-style synthetic long-context tasks, generated here (after NVIDIA/RULER's ``synthetic.yaml`` and
``constants.py``; no downloads).

Tasks: niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery, vt (variable tracking), cwe
(common words), fwe (frequent coded words), and qa_1 / qa_2 when SQuAD v2 / HotpotQA json files are given.

* Haystacks: ``repeat`` (RULER's noise sentence), ``needle`` (distractor needles with random keys and values)
  and ``essay`` (the sentences of every ``*.txt`` in a local folder, e.g. ``jaxspec fetch paul-graham-essays``,
  cycled as needed).
* Keys and values: ``words`` (adjective-noun style pairs of pronounceable pseudo-words from a fixed syllable
  scheme, or of the words of a text file given as ``words_file``), 7-digit ``numbers`` and ``uuids``.
* The task template and its answer prefix are formatted by ``PromptFormat`` (chat template, then the answer
  prefix, as RULER appends it after the model template). The prompt is as long as possible with
  ``prompt tokens + reserve <= length`` in the target tokenizer's tokens: a binary search over the haystack
  size in words (a last haystack sentence may be cut short), so lengths land within a few tokens of the
  target. qa pads with whole documents and lands within one document.
* Everything random is drawn from ``random.Random(f"{seed}:{task}:{length}:{index}")``: a sample depends on
  nothing else, so any subset of samples can be (re)generated alone.

Differences from RULER: pseudo-words instead of the ``wonderwords`` lists; sentence splitting by a regex
instead of NLTK; no in-context example for vt and cwe; fwe normalises its Zipf counts by ζ(α) computed
numerically (RULER calls scipy).
"""

from __future__ import annotations

import functools
import json
import random
import re
import uuid
from pathlib import Path

from experiments.data import PromptFormat, Sample

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.round(np.linspace(0, 100, 40))

TEMPLATES = {  # (task template, answer prefix), RULER constants.py
    "niah": ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
             "{type_needle_v} for {query} mentioned in the provided text?",
             " The special magic {type_needle_v} for {query} mentioned in the provided text are"),
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
           "Question: Find all variables that are assigned the value {query} in the text above.",
           " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
           "assigned the value {query}, they are: "),
    "cwe": ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
            "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
            "list?",
            " Answer: The top 10 words that appear most often in the list are:"),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
            "the dots '....'. What are the three most frequently appeared words in the above coded text?",
            " Answer: According to the coded text above, the three most frequently appeared words are:"),
    "qa": ("Answer the question based on the given documents. Only give me the answer and do not output any other "
           "words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given "
           "documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
           " Answer:"),
}

TASKS = {  # synthetic.yaml
    "niah_single_1": dict(kind="niah", haystack="repeat", k="words", v="numbers"),
    "niah_single_2": dict(kind="niah", haystack="essay", k="words", v="numbers"),
    "niah_single_3": dict(kind="niah", haystack="essay", k="words", v="uuids"),
    "niah_multikey_1": dict(kind="niah", haystack="essay", k="words", v="numbers", num_k=4),
    "niah_multikey_2": dict(kind="niah", haystack="needle", k="words", v="numbers"),
    "niah_multikey_3": dict(kind="niah", haystack="needle", k="uuids", v="uuids"),
    "niah_multivalue": dict(kind="niah", haystack="essay", k="words", v="numbers", num_v=4),
    "niah_multiquery": dict(kind="niah", haystack="essay", k="words", v="numbers", num_k=4, num_q=4),
    "vt": dict(kind="vt", num_chains=1, num_hops=4),
    # below 4096 tokens RULER's cwe repeats each common word 6 times and each other word once (30 / 3 would not
    # leave a 1K prompt room for even the common words)
    "cwe": dict(kind="cwe", freq_cw=30, freq_ucw=3, num_cw=10, short=dict(below=4096, freq_cw=6, freq_ucw=1)),
    "fwe": dict(kind="fwe", alpha=2.0),
    "qa_1": dict(kind="qa", source="squad"),
    "qa_2": dict(kind="qa", source="hotpotqa"),
}
RESERVE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}  # tokens_to_generate kept free of the prompt
MAX_NEW_TOKENS = {"niah": 128, "vt": 64, "cwe": 120, "fwe": 64, "qa": 64}  # generation length at evaluation
METRIC = {"niah": "string_match_all", "vt": "string_match_all", "cwe": "string_match_all",
          "fwe": "string_match_all", "qa": "string_match_part"}
CATEGORIES = {
    "NIAH": [t for t in TASKS if t.startswith("niah")],
    "Multi-hop tracing": ["vt"],
    "Aggregation": ["cwe", "fwe"],
    "QA": ["qa_1", "qa_2"],
}


@functools.lru_cache(maxsize=4)
def word_list(words_file: str | None = None) -> tuple[str, ...]:
    """Distinct lower-case words: those (3+ letters) of ``words_file``, sorted, or else every 2- and
    3-syllable pseudo-word of a fixed consonant-vowel scheme (5,625 + 421,875 words)."""
    if words_file:
        return tuple(sorted(set(re.findall(r"[a-z]{3,}", Path(words_file).read_text().lower()))))
    syl = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"]
    two = [a + b for a in syl for b in syl]
    return tuple(two + [w + c for w in two for c in syl])


@functools.lru_cache(maxsize=4)
def essay_sentences(folder: str) -> tuple[str, ...]:
    """The sentences of every ``*.txt`` in ``folder`` (sorted by name), whitespace collapsed."""
    files = sorted(Path(folder).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no .txt essays in {folder}")
    text = re.sub(r"\s+", " ", " ".join(f.read_text(errors="replace") for f in files)).strip()
    return tuple(re.split(r"(?<=[.!?]) ", text))


def _random(kind: str, rng: random.Random, words: tuple[str, ...]) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(words)}-{rng.choice(words)}"


def insert_at(units: list[str], n_words: int, inserts: list[str], fractions: list[float], sep: str) -> str:
    """The first ``n_words`` words of ``units`` (the last unit cut short), joined by ``sep``, with
    ``inserts[i]`` placed before unit ``int(fractions[i] * count)``; ties keep the order of ``inserts``."""
    out, left = [], n_words
    for u in units:
        if left <= 0:
            break
        w = u.split(" ")
        out.append(" ".join(w[:left]))
        left -= len(w)
    if left > 0:
        raise ValueError(f"haystack too short: {left} more words needed")
    placed = sorted((int(f * len(out)), i) for i, f in enumerate(fractions))
    for pos, i in reversed(placed):
        out.insert(pos, inserts[i])
    return sep.join(out)


def _cycle(units, n_words: int) -> list[str]:
    """``units`` repeated until they hold at least ``n_words`` words."""
    out, have = [], 0
    while have < n_words:
        for u in units:
            out.append(u)
            have += u.count(" ") + 1
    return out


def fit(build, fmt: PromptFormat, tokenizer, budget: int, lo: int, hi: int):
    """The largest size in ``[lo, hi]`` whose prompt fits ``budget`` tokens, by binary search (prompt length
    grows with size). ``build(size) -> (text, answer_prefix, answers, meta)``. Returns ``(size, text, ids, answers,
    meta)`` with ``text`` = task text + answer prefix."""
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        text, prefix, answers, meta = build(mid)
        ids = fmt.ids(tokenizer, text, prefix)
        if len(ids) <= budget:
            best, lo = (mid, text + prefix, ids, answers, meta), mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise ValueError(f"the shortest prompt is longer than {budget} tokens: raise the length")
    return best


def _niah(p, rng, words, budget, depth, essays):
    kind_k, kind_v = p["k"], p["v"]
    num_k, num_v, num_q = p.get("num_k", 1), p.get("num_v", 1), p.get("num_q", 1)
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(_random(kind_k, rng, words))
        values.append([_random(kind_v, rng, words) for _ in range(num_v)])
        needles += [NEEDLE.format(type_needle_v=kind_v, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    if depth is not None:
        fractions = [depth] * len(needles)
    elif p["haystack"] == "essay":
        fractions = [d / 100 for d in rng.sample(DEPTHS, len(needles))]
    else:
        fractions = [rng.random() for _ in needles]
    if p["haystack"] == "repeat":
        units, sep = [NOISE] * (budget // NOISE.count(" ") + 1), "\n"
    elif p["haystack"] == "needle":
        units = [NEEDLE.format(type_needle_v=kind_v, key=_random(kind_k, rng, words), value=_random(kind_v, rng, words))
                 for _ in range(budget // 8 + 1)]
        sep = "\n"
    else:
        if not essays:
            raise ValueError("essay haystacks need essays=FOLDER (e.g. the path `jaxspec fetch paul-graham-essays` "
                             "prints)")
        units, sep = _cycle(essay_sentences(str(essays)), budget), " "
    picked = rng.sample(range(num_k), num_q)
    answers = [v for i in picked for v in values[i]]
    queries = [keys[i] for i in picked]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix = TEMPLATES["niah"]
    type_v = kind_v
    if num_q * num_v == 1:  # RULER's singular wording, applied to template + answer prefix
        template, prefix = ([s.replace("Some", "A").replace("are all", "is").replace("are", "is")
                             .replace("answers", "answer") for s in (template, prefix)])
        type_v = kind_v[:-1]

    def build(n):
        context = insert_at(units, n, needles, fractions, sep)
        return (template.format(type_needle_v=type_v, context=context, query=query),
                prefix.format(type_needle_v=type_v, query=query), answers, {"depths": fractions})

    return build, 1, budget


def _vt(p, rng, words, budget):
    hops, chains = p["num_hops"], p["num_chains"]
    names: list[str] = []
    while len(names) < chains * (hops + 1):
        name = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5))
        if name not in names:
            names.append(name)
    statements, fractions, value0 = [], [], None
    for c in range(chains):
        v = names[c * (hops + 1): (c + 1) * (hops + 1)]
        value = rng.randint(10000, 99999)
        value0 = value if c == 0 else value0
        statements += [f"VAR {v[0]} = {value}"] + [f"VAR {v[j + 1]} = VAR {v[j]}" for j in range(hops)]
        fractions += sorted(rng.random() for _ in range(hops + 1))
    answers = names[: hops + 1]
    units = [NOISE] * (budget // NOISE.count(" ") + 1)
    template, prefix = TEMPLATES["vt"]

    def build(n):
        context = insert_at(units, n, statements, fractions, "\n")
        return (template.format(context=context, query=value0),
                prefix.format(num_v=hops + 1, query=value0), answers, {})

    return build, 1, budget


def _cwe(p, rng, words, budget, sample_seed, length):
    num_cw = p["num_cw"]
    freq_cw, freq_ucw = ((p["short"]["freq_cw"], p["short"]["freq_ucw"]) if length < p["short"]["below"]
                         else (p["freq_cw"], p["freq_ucw"]))
    hi = num_cw + budget // 3
    if hi > len(words):
        raise ValueError(f"cwe needs up to {hi} distinct words, the word list has {len(words)}")
    pool = rng.sample(words, hi)
    template, prefix = TEMPLATES["cwe"]

    def build(n):
        items = pool[:num_cw] * freq_cw + pool[num_cw:n] * freq_ucw
        random.Random(sample_seed).shuffle(items)
        context = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        return template.format(context=context), prefix, pool[:num_cw], {}

    return build, num_cw, hi


def _fwe(p, rng, words, budget, sample_seed, vocab_size=2000, word_len=6):
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=word_len)))
    coded = sorted(vocab)
    rng.shuffle(coded)
    coded[0] = "...."  # the most frequent "word" is noise (RULER)
    alpha = p["alpha"]
    zeta = sum(k ** -alpha for k in range(1, 100_001)) + 100_000 ** (1 - alpha) / (alpha - 1)
    template, prefix = TEMPLATES["fwe"]

    def build(n):
        items = [w for k, w in enumerate(coded, 1) for _ in range(int(n * k ** -alpha / zeta))]
        random.Random(sample_seed).shuffle(items)
        return template.format(context=" ".join(items)), prefix, coded[1:4], {}

    return build, 1, budget


@functools.lru_cache(maxsize=2)
def read_qa(source: str, path: str) -> tuple[list[dict], list[str]]:
    """RULER's ``read_squad`` / ``read_hotpotqa``: (questions, documents). A question holds ``query``,
    ``outputs`` and the indices of its gold ``context`` documents (SQuAD also ``more_context``: the other
    paragraphs of the same article); SQuAD's unanswerable questions are skipped."""
    data = json.loads(Path(path).read_text())
    if source == "squad":
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        at = {c: i for i, c in enumerate(docs)}
        qas = []
        for d in data["data"]:
            article = [at[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                for q in p["qas"]:
                    if not q.get("is_impossible", False):
                        i = at[p["context"]]
                        qas.append({"query": q["question"], "outputs": [a["text"] for a in q["answers"]],
                                    "context": [i], "more_context": [j for j in article if j != i]})
        return qas, docs
    text = lambda t, ps: f"{t}\n{''.join(ps)}"  # noqa: E731
    docs = sorted({text(t, ps) for d in data for t, ps in d["context"]})
    at = {c: i for i, c in enumerate(docs)}
    qas = [{"query": d["question"], "outputs": [d["answer"]], "context": [at[text(t, ps)] for t, ps in d["context"]],
            "more_context": []} for d in data]
    return qas, docs


def _qa(p, rng, index, sample_seed, squad=None, hotpotqa=None):
    path = squad if p["source"] == "squad" else hotpotqa
    if not path:
        raise ValueError(f"qa from {p['source']} needs {p['source']}=FILE (the {p['source']} dev json)")
    qas, docs = read_qa(p["source"], str(path))
    q = qas[index % len(qas)]
    gold, more = q["context"], q["more_context"]
    taken = set(gold + more)
    others = [i for i in range(len(docs)) if i not in taken]
    order = gold + rng.sample(more, len(more)) + rng.sample(others, len(others))
    template, prefix = TEMPLATES["qa"]

    def build(n):
        chosen = [docs[i] for i in order[:n]]
        random.Random(sample_seed).shuffle(chosen)
        context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(chosen))
        return template.format(context=context, query=q["query"]), prefix, q["outputs"], {}

    return build, len(gold), len(docs)


def sample(tokenizer, task: str, length: int, index: int, *, fmt: PromptFormat = PromptFormat(), seed: int = 42,
           essays: str | None = None, words_file: str | None = None, depth: float | None = None,
           squad: str | None = None, hotpotqa: str | None = None) -> Sample:
    """Sample ``index`` of ``task`` at ``length`` tokens (prompt + the task's reserved generation tokens).
    ``depth`` in [0, 1] puts every NIAH needle at that fraction of the haystack (default: RULER's random
    depths)."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; known: {', '.join(TASKS)}")
    p = TASKS[task]
    kind = p["kind"]
    sample_seed = f"{seed}:{task}:{length}:{index}"
    rng = random.Random(sample_seed)
    words = word_list(words_file)
    budget = length - RESERVE[kind]
    if kind == "niah":
        build, lo, hi = _niah(p, rng, words, budget, depth, essays)
    elif kind == "vt":
        build, lo, hi = _vt(p, rng, words, budget)
    elif kind == "cwe":
        build, lo, hi = _cwe(p, rng, words, budget, sample_seed, length)
    elif kind == "fwe":
        build, lo, hi = _fwe(p, rng, words, budget, sample_seed)
    else:
        build, lo, hi = _qa(p, rng, index, sample_seed, squad=squad, hotpotqa=hotpotqa)
    size, text, ids, answers, meta = fit(build, fmt, tokenizer, budget, lo, hi)
    return Sample("ruler", task, index, text, ids, [str(a) for a in answers], MAX_NEW_TOKENS[kind],
                  dict(meta, length=length, size=size))


def samples(tokenizer, task: str, *, length: int, indices, fmt: PromptFormat = PromptFormat(), **options):
    """``sample`` for each index (a generator)."""
    for i in indices:
        yield sample(tokenizer, task, length, i, fmt=fmt, **options)
