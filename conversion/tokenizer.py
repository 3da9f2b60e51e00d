"""One tokenizer for every model source: Hugging Face folders and GGUF metadata.

Everything runs on the ``tokenizers`` library; ``sentencepiece`` is only used to
read a ``tokenizer.model`` file. Three ways in:

* ``load_tokenizer(dir)`` -- a Hugging Face model folder: ``tokenizer.json`` if
  present, else ``tokenizer.model`` (SentencePiece), plus ``tokenizer_config.json``
  (special tokens, ``add_bos_token``, chat template), ``chat_template.jinja`` and
  ``generation_config.json`` (extra end-of-sequence ids), each when present.
* ``tokenizer_from_gguf(metadata)`` -- the ``tokenizer.*`` keys of a GGUF file,
  already read into a dict (string arrays as lists of str, numbers as lists of
  numbers). Two vocabulary kinds, as llama.cpp names them:

  - ``llama``: SentencePiece pieces with scores (U+2581 for a space, byte pieces
    ``<0x00>``..``<0xFF>``). Encoding is SentencePiece BPE: repeatedly merge the
    adjacent pair whose joined piece has the highest score. That is exactly a
    ``tokenizers`` BPE whose merges are every split of every piece, ranked by the
    piece's score, with byte fallback for characters outside the vocabulary.
  - ``gpt2``: byte-level BPE from ``tokens`` + ``merges``; ``tokenizer.ggml.pre``
    picks llama.cpp's pre-tokeniser regexes (see ``GGUF_PRE_TOKENIZERS``).

Control, unknown and user-defined tokens (GGUF / SentencePiece types 3, 2, 4)
are matched whole in the input text, as llama.cpp does, so a rendered chat
template such as ``<|im_start|>user`` encodes to its special ids.

``encode`` never lets the backend add special tokens; it prepends BOS itself when
``add_bos`` (or the ``add_special_tokens`` argument) says so, and adds no EOS.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer", "tokenizer_from_gguf", "GGUF_PRE_TOKENIZERS"]

SPACE = "\u2581"  # SentencePiece's visible space

# GGUF / SentencePiece token types (5 is "unused").
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6

# Special tokens that end a turn; like llama.cpp's end-of-generation list, any of
# these that is a special token of the vocabulary joins ``eos_ids``.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",
    "<|end|>", "<end_of_turn>", "<|return|>", "<|call|>", "</s>",
)

# llama.cpp's pre-tokeniser regexes (src/llama-vocab.cpp), applied in sequence,
# each splitting the pieces of the one before; text a regex does not match stays
# a piece of its own.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")


def _family(names: str, regexes: tuple[str, ...], ignore_merges: bool = False) -> dict:
    return {name: (regexes, ignore_merges) for name in names.split()}


# ``tokenizer.ggml.pre`` -> (regexes, ignore_merges). ``ignore_merges``: a piece
# that is itself a vocabulary entry becomes that token without merging (llama3).
GGUF_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    **_family("default", _DEFAULT),
    **_family("gpt-2 gpt2 phi-2 mpt olmo jais", (_GPT2,)),  # "gpt2": our alias, not a llama.cpp name
    **_family("starcoder refact command-r smollm codeshell exaone minerva-7b", (r"\p{N}", _GPT2)),
    **_family("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2", (_LLAMA3,), True),
    **_family("dbrx smaug-bpe", (_LLAMA3,)),
    **_family("qwen2 deepseek-r1-qwen megrez stablelm2 hunyuan", (_QWEN2,)),
}


class TokenizerError(ValueError):
    """A tokenizer could not be built from the given files or metadata."""


class Tokenizer:
    """Text <-> token ids, special-token ids, and the chat template.

    Attributes: ``backend`` (the ``tokenizers.Tokenizer`` doing the work),
    ``vocab_size`` (number of ids, including added tokens; for GGUF the length of
    ``tokenizer.ggml.tokens``),
    ``bos_id``/``eos_id``/``pad_id`` (``None`` when the model has none),
    ``eos_ids`` (``eos_id`` first, then other end-of-turn ids), ``add_bos``
    (whether ``encode`` prepends BOS by default) and ``chat_template``.
    """

    def __init__(self, backend: _Backend, *, vocab_size: int | None = None, bos_id: int | None = None,
                 eos_id: int | None = None, extra_eos_ids: Iterable[int] = (), pad_id: int | None = None,
                 add_bos: bool = False, chat_template: str | None = None):
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True) if vocab_size is None else vocab_size
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos = bool(add_bos and bos_id is not None)
        self.chat_template = chat_template
        special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        end_of_turn = [backend.token_to_id(t) for t in END_OF_TURN_TOKENS if t in special]
        self.eos_ids = tuple(dict.fromkeys(
            i for i in [eos_id, *extra_eos_ids, *end_of_turn] if i is not None))

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={self.eos_ids}, "
                f"pad_id={self.pad_id}, add_bos={self.add_bos}, chat_template={self.chat_template is not None})")

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of ``text``; BOS first if ``add_special_tokens`` (default: ``add_bos``)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add = self.add_bos if add_special_tokens is None else add_special_tokens
        return [self.bos_id, *ids] if add and self.bos_id is not None else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (any iterable of ints, e.g. a numpy array)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` (``[{"role": ..., "content": ...}, ...]``) with the chat template,
        as ``transformers``' ``apply_chat_template(..., tokenize=False)`` does."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template (none in tokenizer_config.json, "
                                 "chat_template.jinja or the GGUF key tokenizer.chat_template)")
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "pad_token": self.pad_id}
        specials = {name: self.backend.id_to_token(i) for name, i in ids.items() if i is not None}
        return self._compiled_template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              tools=None, documents=None, **specials)

    def save(self, folder: str | Path) -> Path:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` so that
        ``load_tokenizer`` (and transformers) read back the same tokenizer."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        tok = lambda i: self.backend.id_to_token(i) if i is not None else None  # noqa: E731
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok(self.bos_id),
                  "eos_token": tok(self.eos_id), "pad_token": tok(self.pad_id), "add_bos_token": self.add_bos}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": list(self.eos_ids)}))
        return folder

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        # The same environment as transformers: sandboxed, trim/lstrip blocks, loop controls,
        # a tojson that does not HTML-escape, and raise_exception / strftime_now helpers.
        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)


# --------------------------------------------------------------------------- builders


def _add_special_pieces(backend: _Backend, pieces: Sequence[str], types: Sequence[int]) -> None:
    """Make unknown/control pieces special and user-defined ones plain added tokens, all
    matched whole in raw text. They already have ids, so no id changes."""
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                for p, t in zip(pieces, types) if t in (UNKNOWN, CONTROL)])
    backend.add_tokens([AddedToken(p, special=False, normalized=False)
                        for p, t in zip(pieces, types) if t == USER_DEFINED])


def _sentencepiece_backend(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int], *,
                           unk_id: int | None, add_space_prefix: bool = True, unigram: bool = False,
                           pre_normalizers: Sequence[normalizers.Normalizer] = ()) -> _Backend:
    """A SentencePiece vocabulary as a ``tokenizers`` model (BPE by score, or Unigram).

    Text is normalised the SentencePiece way: optional extra normalisers, then a
    ``▁`` in front of every raw-text fragment (``add_space_prefix``) and ``▁`` for
    every space. Decoding reverses it, turning byte pieces into bytes and dropping
    the one leading space the prefix added.
    """
    byte_fallback = BYTE in types  # characters outside the vocabulary become byte pieces
    if unigram:
        model = models.Unigram(list(zip(pieces, map(float, scores))), unk_id=unk_id, byte_fallback=byte_fallback)
    else:
        vocab = {p: i for i, p in reversed(list(enumerate(pieces)))}  # first id wins on duplicates
        model = models.BPE(vocab, _score_merges(pieces, scores, types, vocab),
                           unk_token=None if unk_id is None else pieces[unk_id],
                           fuse_unk=True, byte_fallback=byte_fallback)
    backend = _Backend(model)
    prefix = [normalizers.Prepend(SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*pre_normalizers, *prefix, normalizers.Replace(" ", SPACE)])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    _add_special_pieces(backend, pieces, types)
    return backend


def _score_merges(pieces, scores, types, vocab) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's highest-score-first merging: every way to
    split a normal piece into two vocabulary pieces, best piece score first."""
    merges = []
    for piece, score, kind in zip(pieces, scores, types):
        if kind != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: m[:3])
    return [(left, right) for *_, left, right in merges]


def _byte_level_backend(tokens: Sequence[str], merges: Sequence[str], types: Sequence[int], pre: str) -> _Backend:
    """Byte-level BPE (GPT-2 style) with llama.cpp's pre-tokeniser ``pre``."""
    if pre not in GGUF_PRE_TOKENIZERS:
        raise TokenizerError(f"unknown GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); known: "
                             f"{', '.join(sorted(GGUF_PRE_TOKENIZERS))}")
    regexes, ignore_merges = GGUF_PRE_TOKENIZERS[pre]
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    backend = _Backend(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    _add_special_pieces(backend, tokens, types)
    return backend


# --------------------------------------------------------------------------- GGUF


def tokenizer_from_gguf(metadata: dict[str, Any]) -> Tokenizer:
    """A tokenizer from GGUF metadata (the ``tokenizer.*`` keys of an already-read file)."""
    get = lambda key, default=None: metadata.get(f"tokenizer.ggml.{key}", default)  # noqa: E731
    token_id = lambda key: None if get(key) is None else int(get(key))  # noqa: E731
    kind, tokens = get("model"), get("tokens")
    if kind is None or tokens is None:
        missing = [f"tokenizer.ggml.{k}" for k, v in (("model", kind), ("tokens", tokens)) if v is None]
        raise TokenizerError(f"GGUF metadata has no tokenizer: missing {', '.join(missing)}")
    tokens = [str(t) for t in tokens]
    types = get("token_type")
    types = [NORMAL] * len(tokens) if types is None else [int(t) for t in types]
    if kind == "llama":
        if get("scores") is None:
            raise TokenizerError("GGUF 'llama' tokenizer without tokenizer.ggml.scores")
        backend = _sentencepiece_backend(tokens, [float(s) for s in get("scores")], types,
                                         unk_id=token_id("unknown_token_id"),
                                         add_space_prefix=bool(get("add_space_prefix", True)))
    elif kind == "gpt2":
        if get("merges") is None:
            raise TokenizerError("GGUF 'gpt2' tokenizer without tokenizer.ggml.merges")
        backend = _byte_level_backend(tokens, [str(m) for m in get("merges")], types, get("pre") or "default")
    else:
        raise TokenizerError(f"unsupported GGUF tokenizer model {kind!r} (tokenizer.ggml.model); "
                             "supported: llama, gpt2")
    return Tokenizer(
        backend, vocab_size=len(tokens), bos_id=token_id("bos_token_id"), eos_id=token_id("eos_token_id"),
        extra_eos_ids=[i for i in (token_id("eot_token_id"), token_id("eom_token_id")) if i is not None],
        pad_id=token_id("padding_token_id"), add_bos=bool(get("add_bos_token", kind == "llama")),
        chat_template=metadata.get("tokenizer.chat_template"))


# --------------------------------------------------------------------------- Hugging Face folders


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as err:
        raise TokenizerError(f"{path} is not valid JSON: {err}") from err


def _token_content(value) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or ``{"content": ...}``."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(folder: Path, config: dict) -> str | None:
    """``chat_template.jinja`` (what transformers now writes), else tokenizer_config.json's
    ``chat_template`` (a string, or a list of named templates: take "default")."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def _load_sentencepiece(path: Path) -> tuple[_Backend, dict]:
    """A ``tokenizer.model`` file -> backend, plus its bos/eos/pad ids (``None`` if unset)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as err:  # the generated module needs protobuf
        raise TokenizerError(f"reading {path} needs the 'protobuf' package ({err})") from err
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as err:  # protobuf's DecodeError
        raise TokenizerError(f"{path} is not a SentencePiece model: {err}") from err
    spec, norm, T = proto.trainer_spec, proto.normalizer_spec, sentencepiece_model_pb2.TrainerSpec
    if spec.model_type not in (T.BPE, T.UNIGRAM):
        raise TokenizerError(f"{path}: SentencePiece model type {T.ModelType.Name(spec.model_type)} "
                             "is not supported (BPE and UNIGRAM are)")
    extra = []
    if norm.precompiled_charsmap:
        extra.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:  # spaces only: other whitespace is the charsmap's business
        extra += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    pieces = [p.piece for p in proto.pieces]
    backend = _sentencepiece_backend(
        pieces, [p.score for p in proto.pieces], [p.type for p in proto.pieces],
        unk_id=spec.unk_id if 0 <= spec.unk_id < len(pieces) else None,
        add_space_prefix=norm.add_dummy_prefix, unigram=spec.model_type == T.UNIGRAM, pre_normalizers=extra)
    valid = lambda i: i if 0 <= i < len(pieces) else None  # noqa: E731  (-1 means "none")
    return backend, {"bos": valid(spec.bos_id), "eos": valid(spec.eos_id), "pad": valid(spec.pad_id)}


def _add_config_tokens(backend: _Backend, config: dict, where: Path) -> None:
    """Add tokenizer_config.json's ``added_tokens_decoder`` entries at their stated ids."""
    entries = sorted((int(i), t) for i, t in config.get("added_tokens_decoder", {}).items())
    for token_id, entry in entries:
        token = AddedToken(entry["content"], special=entry.get("special", False),
                           normalized=entry.get("normalized", False), lstrip=entry.get("lstrip", False),
                           rstrip=entry.get("rstrip", False), single_word=entry.get("single_word", False))
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])
        if backend.token_to_id(entry["content"]) != token_id:
            raise TokenizerError(f"{where}: added token {entry['content']!r} is listed with id {token_id} "
                                 f"but lands at id {backend.token_to_id(entry['content'])}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder.

    Reads ``tokenizer.json`` (preferred) or ``tokenizer.model``; ``tokenizer_config.json``,
    ``chat_template.jinja`` and ``generation_config.json`` are optional. ``add_bos`` comes
    from ``add_bos_token`` in the config, else from whether tokenizer.json's
    post-processor adds BOS, else (SentencePiece) true.
    """
    folder = Path(path)
    if not folder.is_dir():
        hint = " (for a GGUF file, read its metadata and use tokenizer_from_gguf)" if folder.is_file() else ""
        raise TokenizerError(f"{folder} is not a model folder{hint}")
    config = _read_json(folder / "tokenizer_config.json")
    generation = _read_json(folder / "generation_config.json")

    if (folder / "tokenizer.json").is_file():
        try:
            backend = _Backend.from_file(str(folder / "tokenizer.json"))
        except Exception as err:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"cannot read {folder / 'tokenizer.json'}: {err}") from err
        spm_ids: dict[str, int | None] = {}
    elif (folder / "tokenizer.model").is_file():
        backend, spm_ids = _load_sentencepiece(folder / "tokenizer.model")
        _add_config_tokens(backend, config, folder / "tokenizer_config.json")
    else:
        raise TokenizerError(f"no tokenizer in {folder}: missing tokenizer.json and tokenizer.model")

    def token_id(name: str) -> int | None:
        content = _token_content(config.get(f"{name}_token"))
        if content is None:
            return spm_ids.get(name)
        if (i := backend.token_to_id(content)) is None:
            raise TokenizerError(f"{folder / 'tokenizer_config.json'}: {name}_token {content!r} "
                                 "is not in the vocabulary")
        return i

    bos_id, eos_id, pad_id = token_id("bos"), token_id("eos"), token_id("pad")
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    elif spm_ids:  # a SentencePiece model: LlamaTokenizer's default
        add_bos = True
    else:
        add_bos = bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]
    gen_eos = generation.get("eos_token_id")
    return Tokenizer(backend, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, add_bos=add_bos,
                     extra_eos_ids=gen_eos if isinstance(gen_eos, list) else [gen_eos],
                     chat_template=_chat_template(folder, config))
