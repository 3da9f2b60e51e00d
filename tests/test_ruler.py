"""RULER-style generator: determinism per seed, needles at the requested depth, lengths within 2 % of the
target in the tokenizer's tokens (a BPE trained here, chat-formatted; and stories260K's when present)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from experiments.data import PromptFormat
from experiments.data import ruler

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
STORIES = ASSETS / "tinyllamas" / "tinyllamas-stories-260k-f32.gguf"
LENGTH_TASKS = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]


class TinyTokenizer:
    """A byte-level BPE trained on RULER-like text, with a fixed chat template."""

    def __init__(self):
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        self.backend = Tokenizer(models.BPE())
        self.backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        words = ruler.word_list()
        corpus = [ruler.NOISE] * 50 + [" ".join(words[i:i + 40]) for i in range(0, 4000, 40)]
        corpus += [" ".join(str(1234567 * i % 9999991) for i in range(50)), ruler.TEMPLATES["niah"][0]]
        trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        self.backend.train_from_iterator(corpus, trainer)

    def encode(self, text, add_special_tokens=None):
        return self.backend.encode(text).ids

    def apply_chat_template(self, messages):
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


@pytest.fixture(scope="module")
def tok():
    return TinyTokenizer()


@pytest.fixture(scope="module")
def essays(tmp_path_factory):
    """A folder of two small 'essays' (repeated sentences, so the haystack has to cycle them)."""
    d = tmp_path_factory.mktemp("essays")
    (d / "a.txt").write_text("Startups grow fast when founders listen. Most ideas look bad at first!\n\n" * 20)
    (d / "b.txt").write_text("Good writing is rewriting. Do things that do not scale? Ask users what they need. " * 20)
    return d


def test_deterministic_per_seed(tok, essays):
    for task in ("niah_multikey_1", "vt", "cwe", "fwe", "niah_multikey_3"):
        a = ruler.sample(tok, task, 3000, 3, seed=7, essays=essays)
        b = ruler.sample(tok, task, 3000, 3, seed=7, essays=essays)
        assert (a.ids, a.answers, a.text) == (b.ids, b.answers, b.text)
        assert ruler.sample(tok, task, 3000, 3, seed=8, essays=essays).text != a.text
        assert ruler.sample(tok, task, 3000, 4, seed=7, essays=essays).text != a.text


@pytest.mark.parametrize("haystack_task", ["niah_single_1", "niah_single_2", "niah_multikey_2"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.75])
def test_needle_at_requested_depth(tok, essays, haystack_task, depth):
    s = ruler.sample(tok, haystack_task, 3000, 0, essays=essays, depth=depth)
    (value,) = s.answers
    start = s.text.index("afterwards.\n") + len("afterwards.\n")
    context = s.text[start: s.text.rindex("\nWhat is the special magic")]
    needle = next(line for line in context.replace(". ", ".\n").split("\n") if value in line)
    assert needle.startswith("One of the special magic numbers for ") and needle.endswith(f"is: {value}.")
    assert context.count(value) == 1
    assert abs(context.index(needle) / len(context) - depth) < 0.05
    assert f"for {s.text.split('for ')[-1].split(' ')[0]} is: {value}." in needle  # the queried key's needle


@pytest.mark.parametrize("task", LENGTH_TASKS)
def test_length_within_two_percent(tok, essays, task):
    kind = ruler.TASKS[task]["kind"]
    fmt = PromptFormat(chat=True, system="Be brief.")
    for length in (3000, 8000):
        s = ruler.sample(tok, task, length, 1, fmt=fmt, essays=essays)
        total = len(s.ids) + ruler.RESERVE[kind]
        assert 0.98 * length <= total <= length, (task, length, total)
        assert s.max_new_tokens == ruler.MAX_NEW_TOKENS[kind]


@pytest.mark.skipif(not STORIES.exists(), reason=f"{STORIES} absent (../shared/assets not beside this checkout)")
@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_multivalue", "vt", "fwe"])
def test_length_in_stories260k_tokens(essays, task):
    import jaxspec

    tok = jaxspec.load(STORIES, quiet=True).tokenizer
    s = ruler.sample(tok, task, 4000, 0, fmt=PromptFormat(chat=False), essays=essays)
    total = len(s.ids) + ruler.RESERVE[ruler.TASKS[task]["kind"]]
    assert 0.98 * 4000 <= total <= 4000
    assert s.ids[0] == tok.bos_id


def test_prompt_format(tok):
    chat = PromptFormat(chat=True, system="Be brief.")
    assert chat.ids(tok, "Task text.", " Answer:") == tok.encode(
        "<|system|>\nBe brief.\n<|user|>\nTask text.\n<|assistant|>\n Answer:")
    assert PromptFormat(chat=False).ids(tok, "Task text.", " Answer:") == tok.encode("Task text. Answer:")


def test_wording_and_answers(tok, essays):
    single = ruler.sample(tok, "niah_single_3", 1500, 0, essays=essays)
    assert single.text.startswith("A special magic uuid is hidden")
    assert single.text.endswith("mentioned in the provided text is")
    assert len(single.answers[0]) == 36 and single.answers[0][14] == "4"  # a version-4 UUID
    multi = ruler.sample(tok, "niah_multiquery", 1500, 0, essays=essays)
    assert multi.text.startswith("Some special magic numbers are hidden") and len(multi.answers) == 4
    assert all(multi.text.count(a) == 1 for a in multi.answers)
    vt = ruler.sample(tok, "vt", 1500, 0)
    chain = [line for line in vt.text.split("\n") if line.startswith("VAR ")]
    assert [c.split()[1] for c in chain] == vt.answers  # the chain in order, first = value
    assert vt.text.endswith("they are: ") and "5 variables are assigned the value" in vt.text
    for length, freq_cw, freq_ucw in ((4096, 30, 3), (1024, 6, 1)):  # RULER's short-context counts below 4096
        cwe = ruler.sample(tok, "cwe", length, 0)
        items = re.findall(r"^\d+\. (\S+)$", cwe.text, re.M)
        assert len(cwe.answers) == 10 and all(items.count(w) == freq_cw for w in cwe.answers)
        assert len(set(items)) > 20 and all(items.count(w) == freq_ucw for w in set(items) - set(cwe.answers))
    fwe = ruler.sample(tok, "fwe", 2000, 0)
    words = fwe.text.split("coded words. ")[1].split("\nQuestion")[0].split()
    top = sorted({w for w in words if w != "...."}, key=words.count, reverse=True)[:3]
    assert top == fwe.answers


def test_qa_from_local_files(tok, tmp_path):
    squad = {"data": [{"paragraphs": [
        {"context": f"Paragraph {i} says the capital of land {i} is city {i}.",
         "qas": [{"question": f"What is the capital of land {i}?", "answers": [{"text": f"city {i}"}],
                  "is_impossible": False},
                 {"question": "Unanswerable?", "answers": [], "is_impossible": True}]}
        for i in range(a * 10, a * 10 + 10)]} for a in range(8)]}
    hotpot = [{"question": f"Who wrote book {i}?", "answer": f"author {i}",
               "context": [[f"Book {i}", [f"Book {i} was written by author {i}.", " It sold well."]],
                           [f"Filler {i}", ["Nothing here."]]]} for i in range(40)]
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    (tmp_path / "hotpot.json").write_text(json.dumps(hotpot))
    s = ruler.sample(tok, "qa_1", 1200, 5, squad=tmp_path / "squad.json")
    assert s.answers == ["city 5"] and "Paragraph 5 says" in s.text and "Document 1:\n" in s.text
    assert len(s.ids) + ruler.RESERVE["qa"] <= 1200 and s.meta["size"] > 10
    h = ruler.sample(tok, "qa_2", 1200, 3, hotpotqa=tmp_path / "hotpot.json")
    assert h.answers == ["author 3"] and "Book 3\nBook 3 was written by author 3. It sold well." in h.text
    with pytest.raises(ValueError, match="squad=FILE"):
        ruler.sample(tok, "qa_1", 1200, 0)
