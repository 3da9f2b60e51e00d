"""Memory planner (``jaxspec plan``): bytes per device for params, KV cache and activations, from the
config alone.

Only ``config.json``, GGUF metadata or checkpoint metadata is read; parameter bytes come from
``param_shapes(cfg)`` and KV bytes from the ``KVCache`` shapes, each split by the same
``ShardingRules`` that ``jaxspec.load(..., mesh=...)`` and ``jaxspec.generate`` use, so the figures
are the bytes those arrays occupy on the most loaded device. Activations are an estimate: the prefill's
largest live buffers for one layer (fp32 attention scores and probabilities against the whole cache,
plus the hidden and MLP buffers), which dominate for long prompts.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxspec.api import InputError
from jaxspec.cache import KVCache
from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import param_shapes
from jaxspec.sharding import ShardingRules, cache_specs, param_specs, parse_mesh, sharding_notes

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"16GiB"`` → 17179869184; also GB (10^9), MiB, plain bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"not a byte size: {text!r} (e.g. 16GiB, 80GB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def read_config(model: str | os.PathLike, dtype: str | None = None) -> ModelConfig:
    """The config of an HF directory, GGUF file, ``jaxspec convert`` checkpoint or (already fetched)
    registry name, without reading any weights."""
    from jaxspec.conversion import checkpoint
    from jaxspec.fetch import REGISTRY, target_path

    path = Path(model)
    if not path.exists() and str(model) in REGISTRY:
        path = target_path(str(model))
        if not path.exists():
            raise InputError(f"{model} is not fetched yet: run `jaxspec fetch {model}` (the planner reads only "
                             f"its metadata, but needs the file)")
    if not path.exists():
        raise FileNotFoundError(f"no such model file or directory: {path}")
    over = {"dtype": dtype, "param_dtype": dtype} if dtype else {}
    if path.is_file():
        from jaxspec.conversion.gguf import GGUFFile, config_from_gguf

        f = GGUFFile(path)
        return config_from_gguf(f.metadata, f.tensors, dtype or "float32")
    if checkpoint.is_checkpoint(path):
        return checkpoint.load_checkpoint_config(path).replace(**over)
    return ModelConfig.from_hf_config(path, **over)


def _per_device(shapes, specs, sizes: dict[str, int]) -> int:
    """Bytes on one device of a tree of shapes split by a matching tree of ``PartitionSpec``s."""
    total = 0
    for s, spec in zip(jax.tree.leaves(shapes), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)),
                       strict=True):
        entries = tuple(spec) + (None,) * (len(s.shape) - len(spec))
        ways = [math.prod(sizes[a] for a in ((e,) if isinstance(e, str) else e or ())) for e in entries]
        total += math.prod(d // n for d, n in zip(s.shape, ways)) * np.dtype(s.dtype).itemsize
    return total


def param_bytes(cfg: ModelConfig, sizes: dict[str, int], rules: ShardingRules | None = None) -> int:
    shapes = param_shapes(cfg)
    return _per_device(shapes, param_specs(shapes, cfg, sizes, rules), sizes)


def kv_bytes(cfg: ModelConfig, batch: int, capacity: int, sizes: dict[str, int],
             rules: ShardingRules | None = None) -> int:
    shapes = jax.eval_shape(lambda: KVCache.create(cfg, batch, capacity))
    return _per_device(shapes, cache_specs(cfg, batch, capacity, sizes, rules), sizes)


def activation_bytes(cfg: ModelConfig, batch: int, tokens: int, capacity: int, sizes: dict[str, int],
                     rules: ShardingRules | None = None) -> int:
    """Estimate: one layer's prefill of ``tokens`` new tokens into a cache of ``capacity`` slots."""
    rules = rules or ShardingRules()

    def split(logical: str, count: int) -> int:  # devices sharing this axis (1 if it does not divide)
        n = math.prod(sizes.get(a, 1) for a in rules.axes(logical))
        return n if count % n == 0 else 1

    b = batch / split("batch", batch)
    heads = cfg.num_heads / split("q_heads", cfg.num_heads)
    ffw = cfg.intermediate_size / split("ffw", cfg.intermediate_size)
    scores = 2 * b * heads * tokens * (capacity + tokens) * 4  # fp32 scores + probabilities
    hidden = b * tokens * (4 * cfg.hidden_size + 3 * ffw) * np.dtype(cfg.dtype).itemsize
    return int(scores + hidden)


def plan(cfg: ModelConfig, *, batch: int, context: int, new_tokens: int = 0, mesh=None,
         rules: ShardingRules | None = None, kv=None, draft: ModelConfig | None = None,
         draft_rules: ShardingRules | None = None, device_memory: int | None = None) -> dict:
    """Bytes per device for serving ``batch`` rows of ``context`` prompt tokens plus ``new_tokens``.

    ``mesh``: a spec string (``"data=2,model=4"``) or ``{axis: size}`` (default: one device). ``kv``: a
    ``jaxspec.kv`` method (its ``slots`` give the compressed cache). ``draft``: the draft's config, sharded
    by ``draft_rules`` (default replicated). ``peak`` is the prefill: params, the full prompt cache (and the
    compressed one it is gathered into), activations; ``decode`` the steady state.
    """
    if batch < 1 or context < 1 or new_tokens < 0:
        raise InputError("batch and context must be >= 1, new_tokens >= 0")
    sizes = parse_mesh(mesh) if not isinstance(mesh, dict) else dict(mesh)
    rules = rules or ShardingRules()
    full = context + new_tokens
    rows = {"params": param_bytes(cfg, sizes, rules), "kv_full": kv_bytes(cfg, batch, full, sizes, rules)}
    kv_slots = None
    if kv is not None:
        kv_slots = kv.slots(context, cfg.num_kv_heads) + int(kv.lookahead) + new_tokens
        rows["kv_compressed"] = kv_bytes(cfg, batch, kv_slots, sizes, rules)
    if draft is not None:
        draft_rules = draft_rules or ShardingRules.replicated()
        rows["draft_params"] = param_bytes(draft, sizes, draft_rules)
        rows["draft_kv"] = kv_bytes(draft, batch, full, sizes, draft_rules)
    rows["activations"] = activation_bytes(cfg, batch, context, full, sizes, rules)
    fixed = rows["params"] + rows.get("draft_params", 0) + rows.get("draft_kv", 0)
    decode_kv = rows.get("kv_compressed", rows["kv_full"])
    peak = fixed + rows["kv_full"] + rows.get("kv_compressed", 0) + rows["activations"]
    notes = sharding_notes(cfg, sizes, rules, batch)
    if kv is not None:
        notes.append(f"{kv.name}: the prefill materialises the full prompt cache before keeping {kv_slots} slots "
                     f"per layer and kv head")
    return {
        "model": {"model_type": cfg.model_type, "num_params": cfg.num_params(), "dtype": cfg.dtype,
                  "param_dtype": cfg.param_dtype},
        "mesh": sizes, "devices": math.prod(sizes.values()) if sizes else 1,
        "batch": batch, "context": context, "new_tokens": new_tokens, "kv_slots": kv_slots,
        "per_device": rows, "peak": peak, "decode": fixed + decode_kv,
        "device_memory": device_memory, "fits": None if device_memory is None else peak <= device_memory,
        "notes": notes,
    }


def _fmt(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_plan(p: dict) -> str:
    mesh = ",".join(f"{a}={n}" for a, n in p["mesh"].items()) or "one device"
    lines = [f"mesh {mesh} ({p['devices']} devices); batch {p['batch']}, context {p['context']} + "
             f"{p['new_tokens']} new tokens; per device:"]
    lines += [f"  {k:<14} {_fmt(v):>12}" for k, v in p["per_device"].items()]
    lines += [f"  {'peak':<14} {_fmt(p['peak']):>12}   (prefill)", f"  {'decode':<14} {_fmt(p['decode']):>12}"]
    if p["fits"] is not None:
        verdict = "fits" if p["fits"] else "does NOT fit"
        lines.append(f"{verdict} in {_fmt(p['device_memory'])} per device")
    lines += [f"note: {n}" for n in p["notes"]]
    return "\n".join(lines)


def main(args) -> int:
    """``jaxspec plan`` (arguments: see ``jaxspec.cli``)."""
    kv = None
    if args.kv is not None:
        from jaxspec.kv import make_method

        kv = make_method(args.kv, **({} if args.capacity is None else {"capacity": args.capacity}))
    elif args.capacity is not None:
        raise InputError("--capacity needs --kv")
    p = plan(read_config(args.model, args.dtype), batch=args.batch, context=args.context,
             new_tokens=args.new_tokens, mesh=args.mesh, kv=kv,
             draft=read_config(args.draft, args.dtype) if args.draft else None,
             device_memory=parse_bytes(args.device_memory) if args.device_memory else None)
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    return 0
