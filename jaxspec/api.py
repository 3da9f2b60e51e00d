"""Python API: ``jaxspec.load`` and ``jaxspec.generate``."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec import sharding
from jaxspec.cache import KVCache
from jaxspec.generation import FINISH_NAMES, PREFILL_CLOCK, Sampling, bucket, generate_tokens, pad_prompts
from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import param_shapes, unstack_layers


class InputError(ValueError):
    """A request jaxspec refuses, with a message that says why."""


@dataclasses.dataclass
class Model:
    """A loaded model: config, params (a pytree of arrays) and tokenizer (may be None). With a ``mesh``
    the params are sharded on it by ``rules`` (``jaxspec.sharding``; None: the default rules)."""

    config: ModelConfig
    params: Any
    tokenizer: Any = None
    source: str = ""
    load_seconds: float = 0.0
    mesh: Any = None
    rules: Any = None


def load(path: str | os.PathLike, *, dtype: str | None = None, quiet: bool = False,
         layout: str | None = None, mesh: jax.sharding.Mesh | None = None,
         rules: sharding.ShardingRules | None = None) -> Model:
    """Load a model from an HF directory, a GGUF file, a ``jaxspec convert`` checkpoint, or a registry name.

    ``dtype`` overrides the compute/param dtype (default float32; "bfloat16" for TPU/GPU).
    ``layout``: "unstacked" (one weight set per layer, unrolled — the default) or "stacked" (``nn.scan`` over
    ``[L, ...]`` weights: compiles 2–3× faster, decodes slower). XLA copies each scanned layer's weight slice
    before its matmuls, which halves decode speed on CPU and on an H100 alike (docs/results.md).
    ``mesh`` (``jaxspec.make_mesh``): params placed on it by ``rules`` (default ``ShardingRules()``), straight
    from the file for HF and orbax checkpoints; dimensions the mesh cannot split are replicated (listed on
    stderr unless ``quiet``).
    """
    layout = layout or "unstacked"
    if layout not in ("stacked", "unstacked"):
        raise InputError(f"layout must be 'stacked' or 'unstacked', got {layout!r}")
    from jaxspec.conversion import checkpoint, hf
    from jaxspec.fetch import resolve_model

    t0 = time.perf_counter()
    path = Path(resolve_model(os.fspath(path), quiet=quiet))
    if not path.exists():
        raise FileNotFoundError(f"no such model file or directory: {path}")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise InputError(f"{path} is neither a GGUF file nor a model directory")
        from jaxspec.conversion.gguf import load_gguf
        from jaxspec.conversion.tokenizer import tokenizer_from_gguf

        put_for = None if mesh is None else (lambda c: sharding.param_put(c, mesh, rules))
        cfg, params, meta = load_gguf(path, dtype=dtype or "float32", put_for=put_for)
        tok = tokenizer_from_gguf(meta)
    elif checkpoint.is_checkpoint(path):
        shardings = None
        if mesh is not None:
            ccfg = checkpoint.load_checkpoint_config(path)
            shardings = sharding.param_shardings(param_shapes(ccfg), ccfg, mesh, rules)
        cfg, params, _ = checkpoint.load_checkpoint(path, shardings=shardings)
        if dtype:
            cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
            params = jax.tree.map(lambda a: a.astype(dtype), params)
        tok = _maybe_tokenizer(path / "tokenizer")
    else:
        put = None if mesh is None else sharding.param_put(ModelConfig.from_hf_config(path), mesh, rules)
        cfg, params = hf.load_hf(path, dtype=dtype, put=put)
        tok = _maybe_tokenizer(path)
    if layout == "unstacked":
        params = unstack_layers(params)
    if mesh is not None:
        params = sharding.shard_params(params, cfg, mesh, rules)
        if not quiet:
            for note in sharding.sharding_notes(cfg, mesh, rules):
                print(f"jaxspec: sharding: {note}", file=sys.stderr)
    return Model(cfg, params, tok, source=str(path), load_seconds=time.perf_counter() - t0, mesh=mesh, rules=rules)


def _maybe_tokenizer(path: Path):
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        return None
    from jaxspec.conversion.tokenizer import load_tokenizer

    return load_tokenizer(path)


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]
    text: str | None
    finish_reason: str
    prompt_tokens: int
    timings: dict[str, float]
    tokens_per_second: float
    kv: dict | None = None  # KV-compression accounting (generate(..., kv=...)), see jaxspec.kv.pipeline
    pc: dict | None = None  # prompt-compression accounting (generate(..., pc=...)), see jaxspec.pc.pipeline

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def encode_prompt(model: Model, prompt: str | Sequence[int], chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of one prompt (text or ids), validated against the model."""
    if isinstance(prompt, str):
        if not prompt:
            raise InputError("empty prompt")
        if model.tokenizer is None:
            raise InputError("this model has no tokenizer: pass token ids (--prompt-ids)")
        if chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            ids = model.tokenizer.encode(model.tokenizer.apply_chat_template(msgs), add_special_tokens=False)
        else:
            ids = model.tokenizer.encode(prompt)
    else:
        ids = list(prompt)
        if chat:
            raise InputError("chat templates apply to text prompts, not token ids")
    if not ids:
        raise InputError("empty prompt")
    bad = [i for i in ids if not isinstance(i, (int, np.integer)) or not 0 <= int(i) < model.config.vocab_size]
    if bad:
        raise InputError(f"prompt ids must be integers in [0, {model.config.vocab_size}); got {bad[:5]}")
    if len(ids) > model.config.max_position_embeddings:
        raise InputError(
            f"prompt has {len(ids)} tokens, longer than the model's context ({model.config.max_position_embeddings})"
        )
    return [int(i) for i in ids]


def check_same_vocabulary(target: Model, draft: Model) -> None:
    """Refuse a draft whose token ids mean something else to the target (draft ids go to it as they are)."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise InputError(f"draft and target vocabularies differ: {draft.config.vocab_size} vs "
                         f"{target.config.vocab_size} ids")
    dt, tt = draft.tokenizer, target.tokenizer
    if dt is not None and tt is not None and dt.backend.get_vocab(True) != tt.backend.get_vocab(True):
        raise InputError("draft and target tokenizers map tokens to different ids")


PAD_ID = 0  # token written into padding and finished rows' output slots (never attended to)


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated generation request: encoded prompts, padded to a bucket, and the static sizes."""

    single: bool  # one prompt given (not a list): return one result
    ids: list[list[int]]
    prepared: Any  # PreparedBatch
    stop_ids: list[int]
    stops: jax.Array  # [K] int32, -1 padded
    max_steps: int  # bucketed max_new_tokens
    capacity: int  # KV cache slots


def default_stop_ids(model: Model) -> list[int]:
    """The ids generation stops at when the caller names none: the config's and the tokenizer's end tokens."""
    tok_eos = getattr(model.tokenizer, "eos_ids", ()) or ()
    return sorted(set(model.config.eos_token_ids) | set(tok_eos))


def prepare_request(model: Model, prompts, max_new_tokens: int, chat: bool, stop_ids, cache_capacity) -> Request:
    """Shared front half of every generation path (plain, KV-compressed, speculative)."""
    single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
    batch = [prompts] if single else list(prompts)
    if not batch:
        raise InputError("no prompts")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = [encode_prompt(model, p, chat=chat) for p in batch]
    if stop_ids is None:
        stop_ids = default_stop_ids(model)
    prepared = pad_prompts(ids, PAD_ID)
    max_steps = bucket(max_new_tokens)
    T = prepared.tokens.shape[1]
    capacity = cache_capacity if cache_capacity is not None else T + max_steps
    if capacity < T:
        raise InputError(f"cache capacity {capacity} is smaller than the padded prompt ({T} tokens)")
    stops = np.full((max(8, len(stop_ids)),), -1, np.int32)
    stops[: len(stop_ids)] = stop_ids
    return Request(single, ids, prepared, list(stop_ids), jnp.asarray(stops), max_steps, capacity)


class _Compiled:
    """Compiled generation programs keyed by (config, shapes): one compile per bucket."""

    def __init__(self):
        self._table: dict[tuple, Any] = {}

    def get(self, args: tuple, static: dict, fn=generate_tokens) -> tuple[Any, float]:
        """The compiled ``fn`` (a jitted function; default ``generate_tokens``) for these arguments."""
        key = (fn, jax.tree.structure(args),  # shardings too: another mesh or layout is another program
               tuple((a.shape, str(a.dtype), a.sharding) for a in jax.tree.leaves(args)),
               tuple(sorted(static.items())))
        if key in self._table:
            return self._table[key], 0.0
        t0 = time.perf_counter()
        exe = fn.lower(*args, **static).compile()
        self._table[key] = exe
        return exe, time.perf_counter() - t0

    def __len__(self):
        return len(self._table)


COMPILED = _Compiled()


def generate(
    model: Model,
    prompts: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    chat: bool = False,
    cache_capacity: int | None = None,
    kv: Any = None,
    draft: Model | None = None,
    kept_indices: bool = False,
    speculative: Any = None,
    pc: Any = None,
) -> GenerationResult | list[GenerationResult]:
    """Generate continuations. A single prompt (str or id list) returns one result, a list of prompts a list.

    ``stop_ids`` default to the model's EOS ids. ``cache_capacity`` bounds the KV cache (default: room
    for the whole request); a row that runs out of cache stops with finish_reason ``cache_full``.
    ``kv``: a KV-compression method (``jaxspec.kv``: a config such as ``SpecKV(capacity=256)``, or a
    registry name) applied to the prompt's cache; ``draft`` is the draft model of methods that need one.
    Each result then carries ``kv`` accounting (``kept_indices`` adds the kept positions).
    ``speculative``: a drafter (``jaxspec.drafters``: a name such as "ngram" or "draft-model", or a drafter
    object such as ``ADED(table=TrigramTable.load(path))``) for lossless speculative decoding; "draft-model"
    uses ``draft``. Results then also carry ``accepted_per_step`` and ``target_forwards``.
    ``pc``: a prompt-compression method (``jaxspec.pc``: a config such as ``SpecPC(capacity=1024)``, or a
    registry name), run first with ``draft``; generation then starts from the compressed prompts, with
    ``kv=`` (SpecPC + SpecKV reuses the draft's lookahead: SpecKV-PC) or ``speculative=`` if given. Results
    then carry ``pc`` accounting (``kept_indices`` adds the kept prompt positions).
    """
    if pc is not None:
        from jaxspec.pc import make_method as make_pc
        from jaxspec.pc.pipeline import generate as pc_generate

        return pc_generate(model, prompts, make_pc(pc), draft=draft, kv=kv, speculative=speculative,
                           max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                           stop_ids=stop_ids, chat=chat, cache_capacity=cache_capacity, kept_indices=kept_indices)
    if speculative is not None:
        if kv is not None:
            raise InputError("choose either kv compression or speculative decoding, not both")
        from jaxspec.drafters import make_drafter
        from jaxspec.speculative import generate_speculative

        try:
            drafter = make_drafter(speculative) if isinstance(speculative, str) else speculative
            return generate_speculative(
                model, prompts, drafter, draft_model=draft, max_new_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids, chat=chat, cache_capacity=cache_capacity)
        except ValueError as e:  # e.g. draft-model without a draft
            raise InputError(str(e)) from e
    req = prepare_request(model, prompts, max_new_tokens, chat, stop_ids, cache_capacity)
    if kv is not None or draft is not None:
        from jaxspec.kv import make_method
        from jaxspec.kv.pipeline import generate as kv_generate

        if cache_capacity is not None:
            raise InputError("cache_capacity does not apply to kv-compressed generation")
        if kv is None:
            raise InputError("a draft model needs kv='speckv' (or another kv method that uses one) or "
                             "speculative='draft-model'")
        results = kv_generate(model, req.ids, make_method(kv), draft=draft, max_new_tokens=max_new_tokens,
                              sampling=Sampling.make(temperature, top_k, top_p), seed=seed,
                              stop_ids=req.stop_ids, kept_indices=kept_indices)
        return results[0] if req.single else results
    cfg, tok, batch, ids = model.config, model.tokenizer, req.ids, req.ids
    cache = (KVCache.create(cfg, len(batch), req.capacity) if model.mesh is None
             else sharding.create_cache(cfg, len(batch), req.capacity, model.mesh, model.rules))
    args = (model.params, req.prepared.tokens, req.prepared.lengths, cache, jax.random.PRNGKey(seed),
            jnp.int32(max_new_tokens), req.stops, Sampling.make(temperature, top_k, top_p))
    if model.mesh is not None:  # prompts split over the batch axis, the rest replicated: jit follows
        args = sharding.place_args(args, model.mesh, model.rules, batched=(1, 2))
    exe, compile_s = COMPILED.get(args, {"cfg": cfg, "max_steps": req.max_steps, "pad_id": PAD_ID})
    PREFILL_CLOCK.t = None
    t0 = time.perf_counter()
    out = exe(*args)
    jax.block_until_ready(out.tokens)
    t1 = time.perf_counter()
    run_s = t1 - t0
    prefill_s = (PREFILL_CLOCK.t or t1) - t0

    tokens, n_gen, reasons = (sharding.to_host(x) for x in (out.tokens, out.num_generated, out.finish_reason))
    total_new = int(n_gen.sum())
    timings = {"load": model.load_seconds, "compile": compile_s, "prefill": prefill_s, "decode": run_s - prefill_s}
    results = []
    for i in range(len(batch)):
        gen = tokens[i, : n_gen[i]].tolist()
        text = tok.decode(gen) if tok is not None else None
        tps = (total_new - len(batch)) / timings["decode"] if timings["decode"] > 0 else 0.0
        results.append(GenerationResult(gen, text, FINISH_NAMES[int(reasons[i])], len(ids[i]), dict(timings), tps))
    return results[0] if req.single else results
