"""Tests for jaxspec.conversion.tokenizer.

References: ``transformers`` tokenizers (test-only) and ``sentencepiece`` itself, on
tokenizers trained here on generated text. Tests marked ``real`` use the llama2.c
``stories260K`` vocabulary from ``../shared/assets`` and compare against
transformers on real GGUF files; they skip when those files are absent.
"""

from __future__ import annotations

import io
import json
import random
import struct
from pathlib import Path

import jinja2
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

from conftest import shared_asset
from jaxspec.conversion.tokenizer import (
    GGUF_PRE_TOKENIZERS, Tokenizer, TokenizerError, load_tokenizer, tokenizer_from_gguf)

transformers = pytest.importorskip("transformers")

# Mixed text: code, accents, CJK, emoji, runs of spaces, tabs/newlines, digits.
MIXED = [
    "Hello world",
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(1, 2))",
    "Ünïcödé café — naïve façade; 你好，世界！ こんにちは 😀👍🏽",
    "digits 12345 and 3.14159, 1e-9; x=0x1F",
    "runs   of    spaces\n\n\nand\r\nnewlines  ",
    "It's we'll they'RE",
]
LEADING_SPACE = ["  two leading spaces", " one", "\n\tindent"]

CHATML = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA2 = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
          "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there! 你好"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
]


WORDS = ("the of and to in is was he for it with as his on be at by had are but from or have an they which "
         "one you were her all she there would their we him been has when who will more no if out so said what "
         "up its about into than them can only other new some could time these two may then do first any my now "
         "such like our over man me even most made after also did many before must through back years where much "
         "your way well down should because each just those people how too little state good very make world "
         "still own see men work long get here between both life being under never day same another know while "
         "last might us great old year off come since against go came right used take three def return print "
         "café naïve 你好 世界").split()


def corpus(n_lines: int = 3000) -> list[str]:
    """Deterministic training text: random sentences with punctuation, digits and code, plus MIXED."""
    rng = random.Random(0)
    lines = [" ".join(rng.choices(WORDS, k=rng.randint(3, 15))).capitalize()
             + rng.choice([".", ",", "!", "?", f" {rng.randint(0, 99999)}.", "():", " = [1, 2]"])
             for _ in range(n_lines)]
    return lines + MIXED * 10


def assert_chat_templates_match(ours: Tokenizer, ref) -> None:
    for messages in CONVERSATIONS:
        for add_gen in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=add_gen) == \
                ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_gen)


# --------------------------------------------------------------------------- HF folder: tokenizers BPE


def train_byte_level_bpe() -> Backend:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus(), trainer)
    return backend


@pytest.fixture(scope="module")
def byte_level_bpe() -> Backend:
    return train_byte_level_bpe()


@pytest.fixture(params=["tokenizer_config.json", "chat_template.jinja"])
def bpe_dir(request, tmp_path, byte_level_bpe):
    """A folder written by transformers' save_pretrained; the chat template either in
    tokenizer_config.json or in chat_template.jinja (what transformers 5 writes)."""
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level_bpe, bos_token="<|endoftext|>",
                                              eos_token="<|im_end|>", chat_template=CHATML)
    hf.save_pretrained(tmp_path)
    if request.param == "tokenizer_config.json":
        (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return tmp_path


def test_hf_bpe_folder_matches_transformers(bpe_dir):
    ours, ref = load_tokenizer(bpe_dir), transformers.AutoTokenizer.from_pretrained(bpe_dir)
    assert ref.chat_template == CHATML  # transformers found the template where we put it
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (500, 0, 2, None, False)
    assert ours.eos_ids == (2, 0)
    for text in MIXED + LEADING_SPACE + ["<|im_start|>user\nhi<|im_end|>\n"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert_chat_templates_match(ours, ref)


def test_chat_template_raise_exception(bpe_dir):
    with pytest.raises(jinja2.TemplateError, match="bad role tool"):
        load_tokenizer(bpe_dir).apply_chat_template([{"role": "tool", "content": "x"}])


# --------------------------------------------------------------------------- HF folder: SentencePiece


def train_sentencepiece(**options) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=model,
                                   minloglevel=2, **options)
    return model.getvalue()


@pytest.fixture(scope="module")
def llama_style_spm() -> bytes:
    """A Llama-style SentencePiece BPE: byte fallback, identity normalisation, whitespace kept."""
    return train_sentencepiece(model_type="bpe", vocab_size=400, byte_fallback=True, split_digits=True,
                               normalization_rule_name="identity", remove_extra_whitespaces=False,
                               allow_whitespace_only_pieces=True, user_defined_symbols=["<tool>"])


def added_token(content: str) -> dict:
    return {"content": content, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
            "single_word": False}


@pytest.fixture
def spm_dir(tmp_path, llama_style_spm):
    """tokenizer.model + a Llama-style tokenizer_config.json that adds one token past the vocabulary."""
    (tmp_path / "tokenizer.model").write_bytes(llama_style_spm)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": LLAMA2,
        "added_tokens_decoder": {"1": added_token("<s>"), "400": added_token("<|im_start|>")}}))
    return tmp_path


def test_sentencepiece_folder_matches_sentencepiece_and_transformers(spm_dir, llama_style_spm):
    ours = load_tokenizer(spm_dir)
    sp = spm.SentencePieceProcessor(model_proto=llama_style_spm)
    ref = transformers.LlamaTokenizer.from_pretrained(spm_dir)
    assert (ours.vocab_size, ours.bos_id, ours.eos_ids, ours.add_bos) == (401, 1, (2,), True)
    # The added token gets the same id as in transformers; the text after it gets a "▁" prefix
    # as in llama.cpp (transformers with legacy=False adds none there).
    assert ref.encode("<|im_start|>Hi")[:2] == [1, 400]
    assert ours.encode("<|im_start|>Hi") == [1, 400, *ours.encode("Hi", False)]
    for text in MIXED + LEADING_SPACE:
        ids = ours.encode(text)
        assert ids == [1, *sp.encode(text)], text
        assert ours.decode(ids) == sp.decode(ids[1:]) == text
        assert ours.encode(text, add_special_tokens=False) == ids[1:]
        # transformers' Metaspace pre-tokeniser adds no "▁" in front of text that already
        # starts with a space, unlike SentencePiece and llama.cpp; elsewhere they agree.
        if not text[0].isspace():
            assert ids == ref.encode(text), text
    assert_chat_templates_match(ours, ref)


def test_sentencepiece_special_and_user_defined_pieces(spm_dir):
    ours = load_tokenizer(spm_dir)
    tool = ours.backend.token_to_id("<tool>")
    ids = ours.encode("a<tool>b</s>", add_special_tokens=False)
    # Matched whole; like llama.cpp, each text fragment after a matched token gets its own "▁" prefix.
    assert ids == [*ours.encode("a", False), tool, *ours.encode("b", False), 2]
    assert ours.decode(ids, skip_special_tokens=False) == "a<tool> b</s>"


@pytest.mark.parametrize("options", [
    dict(model_type="unigram", vocab_size=200),  # SentencePiece defaults: NFKC, extra whitespace removed
    dict(model_type="bpe", vocab_size=400, byte_fallback=True, normalization_rule_name="identity"),
], ids=["unigram-nfkc", "bpe-identity-trimmed"])
def test_sentencepiece_normalisation_options(tmp_path, options):
    proto = train_sentencepiece(**options)
    (tmp_path / "tokenizer.model").write_bytes(proto)
    ours, sp = load_tokenizer(tmp_path), spm.SentencePieceProcessor(model_proto=proto)
    assert ours.add_bos and ours.bos_id == 1 and ours.chat_template is None
    for text in MIXED + LEADING_SPACE + ["ﬁne Ｆｕｌｌ width\u3000space", "  \n a  \t b \n\n", " "]:
        assert ours.encode(text) == [1, *sp.encode(text)], text


# --------------------------------------------------------------------------- GGUF metadata: llama (stories260K)


def tok512_metadata() -> dict:
    """GGUF-style metadata for the stories260K vocabulary, from llama2.c's tokenizer.bin layout."""
    data, offset, pieces, scores = shared_asset("tinyllamas/tok512.bin").read_bytes(), 4, [], []
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8:offset + 8 + length].decode("utf-8"))
        scores.append(score)
        offset += 8 + length
    pieces[1:3] = ["<s>", "</s>"]  # llama2.c spells them "\n<s>\n", "\n</s>\n"
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p.replace(" ", "\u2581") for p in pieces],
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 259),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
    }


def sentencepiece_from_metadata(meta: dict) -> spm.SentencePieceProcessor:
    """The real sentencepiece library running the same vocabulary (needs protobuf)."""
    pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = pb2.ModelProto()
    proto.trainer_spec.model_type = pb2.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.remove_extra_whitespaces = False
    for piece, score, kind in zip(*(meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))):
        proto.pieces.add(piece=piece, score=score, type=kind)
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def test_gguf_llama_vocabulary_stories260k():
    meta = tok512_metadata()
    ours, sp = tokenizer_from_gguf(meta), sentencepiece_from_metadata(meta)
    assert (ours.vocab_size, ours.bos_id, ours.eos_ids, ours.add_bos) == (512, 1, (2,), True)
    golden = shared_asset("tinyllamas/stories260K_greedy200_expected.txt").read_text(encoding="utf-8")
    ids = ours.encode(golden)
    assert ids[0] == 1 and ids[1:] == sp.encode(golden)
    assert ours.decode(ids) == golden  # BOS skipped, leading space of the first piece dropped
    assert ours.decode(ids[1:]) == golden
    for text in MIXED + LEADING_SPACE:  # emoji/CJK fall back to byte pieces
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert ours.decode(ids) == text
    assert ours.encode("<s>Once</s>", add_special_tokens=False) == [1, *ours.encode("Once", False), 2]


# --------------------------------------------------------------------------- GGUF metadata: gpt2


def gpt2_metadata(backend: Backend, pre: str) -> dict:
    """GGUF-style metadata for a trained byte-level BPE, plus a user-defined token."""
    model = json.loads(backend.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get) + ["<think> é"]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t.startswith("<|") else 1 for t in tokens[:-1]] + [4],
        "tokenizer.ggml.merges": [" ".join(m) for m in model["merges"]],
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": CHATML,
    }


def test_gguf_gpt2_matches_source_tokenizer(byte_level_bpe):
    ours = tokenizer_from_gguf(gpt2_metadata(byte_level_bpe, "gpt-2"))
    assert (ours.vocab_size, ours.add_bos, ours.eos_ids) == (501, False, (2, 0))
    for text in MIXED + LEADING_SPACE + ["<|im_start|>user\nhi<|im_end|>\n"]:
        ids = ours.encode(text)
        assert ids == byte_level_bpe.encode(text).ids, text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("a<think> é") == [*ours.encode("a"), 500]
    assert ours.decode(ours.encode("<|im_start|>x<think> é")) == "x<think> é"


def test_save_then_load_is_the_same_tokenizer(byte_level_bpe, tmp_path):
    ours = tokenizer_from_gguf(gpt2_metadata(byte_level_bpe, "qwen2"))
    back = load_tokenizer(ours.save(tmp_path / "tok"))
    assert (back.bos_id, back.eos_ids, back.add_bos) == (ours.bos_id, ours.eos_ids, ours.add_bos)
    for text in MIXED + ["<|im_start|>user\nhi<|im_end|>\n"]:
        assert back.encode(text) == ours.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert back.apply_chat_template(msgs) == ours.apply_chat_template(msgs)


@pytest.mark.parametrize("pre", sorted(GGUF_PRE_TOKENIZERS))
def test_every_known_pre_tokenizer_round_trips(byte_level_bpe, pre):
    ours = tokenizer_from_gguf(gpt2_metadata(byte_level_bpe, pre))
    for text in MIXED + LEADING_SPACE:
        assert ours.decode(ours.encode(text)) == text


def test_smollm_pre_tokenizer_splits_digits(byte_level_bpe):
    gpt2, smollm = (tokenizer_from_gguf(gpt2_metadata(byte_level_bpe, pre)) for pre in ("gpt-2", "smollm"))
    assert len(smollm.encode("12345")) == 5
    assert gpt2.encode("hello") == smollm.encode("hello")


# --------------------------------------------------------------------------- errors


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json and tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="not a model folder"):
        load_tokenizer(tmp_path / "nowhere")


def test_added_token_at_wrong_id(spm_dir):
    config = json.loads((spm_dir / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {"405": added_token("<|gap|>")}
    (spm_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="listed with id 405 but lands at id 400"):
        load_tokenizer(spm_dir)


def test_no_chat_template(byte_level_bpe):
    meta = {k: v for k, v in gpt2_metadata(byte_level_bpe, "gpt-2").items() if k != "tokenizer.chat_template"}
    with pytest.raises(TokenizerError, match="no chat template"):
        tokenizer_from_gguf(meta).apply_chat_template([{"role": "user", "content": "hi"}])


def test_unknown_pre_tokenizer(byte_level_bpe):
    with pytest.raises(TokenizerError, match="unknown GGUF pre-tokenizer 'klingon'.*qwen2"):
        tokenizer_from_gguf(gpt2_metadata(byte_level_bpe, "klingon"))


def test_bad_gguf_metadata():
    with pytest.raises(TokenizerError, match="tokenizer.ggml.tokens"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(TokenizerError, match="unsupported GGUF tokenizer model 'bert'"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


# --------------------------------------------------------------------------- real GGUF files


def read_metadata(path: Path) -> dict:
    """GGUF metadata via the project's reader if there is one, else gguf.GGUFReader."""
    try:
        from jaxspec.conversion.gguf import read_gguf_metadata
    except ImportError:
        gguf = pytest.importorskip("gguf")
        fields = gguf.GGUFReader(path).fields.values()
        return {f.name: list(f.contents()) if f.types[0] == gguf.GGUFValueType.ARRAY else f.contents()
                for f in fields if f.types}
    return read_gguf_metadata(path)


REAL = {  # registry name -> expected (bos_id, eos_ids, add_bos)
    "qwen2.5-coder-0.5b-instruct": (151643, (151645, 151643), False),
    "smollm2-135m-instruct": (1, (2, 0), False),
}


@pytest.fixture(scope="module", params=sorted(REAL))
def real_gguf(request):
    from jaxspec.fetch import fetch

    path = fetch(request.param, quiet=True)  # marker `real`: fetched (pinned, sha256-verified) on first use
    ours = tokenizer_from_gguf(read_metadata(path))
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return request.param, ours, ref


@pytest.mark.real
def test_real_gguf_matches_transformers(real_gguf):
    name, ours, ref = real_gguf
    assert (ours.bos_id, ours.eos_ids, ours.add_bos) == REAL[name]
    chat = "<|im_start|>user\nhi 12345<|im_end|>\n<|im_start|>assistant\n"
    for text in MIXED + LEADING_SPACE + [chat]:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ours.encode(chat)) == "user\nhi 12345\nassistant\n"
    assert_chat_templates_match(ours, ref)
