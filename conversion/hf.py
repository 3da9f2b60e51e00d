"""HuggingFace safetensors checkpoints <-> jaxspec params.

The mapping is data: ``KEY_TABLE`` pairs each jaxspec parameter path with its HF tensor name (``{i}``
for the layer index). Both sides store matrices ``[out, in]``, so tensors are copied as they are.
Import streams one tensor at a time from single-file or sharded (``model.safetensors.index.json``)
checkpoints; pickled ``*.bin`` checkpoints are refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxspec.conversion.atomic import atomic_directory
from jaxspec.models.config import ModelConfig
from jaxspec.models.transformer import param_shapes, stack_layers


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing files, missing or misshapen tensors."""


# (our path, HF name). Layer entries carry "{i}" and are stacked on a leading [L] axis.
KEY_TABLE: tuple[tuple[str, str], ...] = (
    ("embed_tokens/embedding", "model.embed_tokens.weight"),
    ("layers/input_layernorm/scale", "model.layers.{i}.input_layernorm.weight"),
    ("layers/self_attn/q_proj/weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers/self_attn/k_proj/weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers/self_attn/v_proj/weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers/self_attn/o_proj/weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers/self_attn/q_proj/bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("layers/self_attn/k_proj/bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("layers/self_attn/v_proj/bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("layers/self_attn/q_norm/scale", "model.layers.{i}.self_attn.q_norm.weight"),
    ("layers/self_attn/k_norm/scale", "model.layers.{i}.self_attn.k_norm.weight"),
    ("layers/post_attention_layernorm/scale", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers/mlp/gate_proj/weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers/mlp/up_proj/weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers/mlp/down_proj/weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("norm/scale", "model.norm.weight"),
    ("lm_head/weight", "lm_head.weight"),
)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {p: (tuple(s.shape), np.dtype(s.dtype)) for p, s in flatten(param_shapes(cfg)).items()}


def _table(cfg: ModelConfig) -> Iterator[tuple[str, str, tuple[int, ...], np.dtype]]:
    shapes = expected_shapes(cfg)
    known = {path for path, _ in KEY_TABLE}
    extra = set(shapes) - known
    if extra:  # a param the table forgot: a bug in this module, not in the user's checkpoint
        raise AssertionError(f"KEY_TABLE lacks {sorted(extra)}")
    for path, name in KEY_TABLE:
        if path in shapes:
            shape, dtype = shapes[path]
            yield path, name, shape, dtype


class _SafetensorsDir:
    """Tensor lookup over one or several safetensors files of a model directory."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {k: model_dir / f for k, f in weight_map.items()}
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
                    raise CheckpointError(
                        f"{model_dir} holds only pickled PyTorch weights (*.bin/*.pt); jaxspec never unpickles "
                        "untrusted files. Convert them to safetensors first."
                    )
                raise CheckpointError(f"no weights (*.safetensors) in {model_dir}")
            self.where = {}
            for f in files:
                with safe_open(f, framework="numpy") as h:
                    for k in h.keys():
                        self.where[k] = f
        for f in set(self.where.values()):
            if not f.is_file():
                raise CheckpointError(f"missing weight file {f} (named in the index)")
        self._open: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> np.ndarray:
        f = self.where[name]
        if f not in self._open:
            self._open[f] = safe_open(f, framework="numpy").__enter__()
        return self._open[f].get_tensor(name)

    def close(self):
        for h in self._open.values():
            h.__exit__(None, None, None)
        self._open.clear()


def load_hf_params(model_dir: str | os.PathLike, cfg: ModelConfig, put=None) -> dict:
    """Stream an HF safetensors checkpoint into the jaxspec parameter tree.

    ``put(path, np_array) -> array`` places each finished leaf (default ``jnp.asarray``); sharded
    loading passes a function that ``device_put``s onto the leaf's ``NamedSharding``.
    """
    import jax.numpy as jnp

    put = put or (lambda _path, a: jnp.asarray(a))
    src = _SafetensorsDir(Path(model_dir))
    flat: dict[str, Any] = {}
    try:
        for path, name, shape, dtype in _table(cfg):
            if "{i}" not in name:
                flat[path] = put(path, _read(src, name, shape, dtype))
                continue
            out = np.empty(shape, dtype)
            for i in range(cfg.num_layers):
                out[i] = _read(src, name.format(i=i), shape[1:], dtype)
            flat[path] = put(path, out)
    finally:
        src.close()
    return unflatten(flat)


def _read(src: _SafetensorsDir, name: str, shape, dtype) -> np.ndarray:
    if name not in src:
        raise CheckpointError(f"checkpoint lacks tensor {name!r}")
    t = src.get(name)
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return np.asarray(t, dtype=dtype)


def load_hf(model_dir: str | os.PathLike, dtype: str | None = None, put=None) -> tuple[ModelConfig, dict]:
    """Config and params from an HF model directory (config.json + safetensors)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"not a directory: {model_dir}")
    overrides = {"dtype": dtype, "param_dtype": dtype} if dtype else {}
    cfg = ModelConfig.from_hf_config(model_dir, **overrides)
    return cfg, load_hf_params(model_dir, cfg, put=put)


def hf_state_dict(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """HF tensor name -> numpy array, the inverse of ``load_hf_params``."""
    flat = flatten(stack_layers(params))
    out: dict[str, np.ndarray] = {}
    for path, name, _shape, _dtype in _table(cfg):
        a = np.asarray(flat[path])
        layers = [(name.format(i=i), a[i]) for i in range(cfg.num_layers)] if "{i}" in name else [(name, a)]
        for n, t in layers:
            out[n] = np.ascontiguousarray(t)
    return out


def save_hf(cfg: ModelConfig, params: dict, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write an HF directory (config.json + model.safetensors [+ tokenizer files]) that transformers loads.

    Written into a temporary sibling directory and renamed into place, so a failure leaves nothing.
    """
    with atomic_directory(out_dir, CheckpointError) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2))
        save_file(hf_state_dict(cfg, params), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(out_dir)
