"""Orbax checkpoints of converted models: fast reloads without re-reading or dequantising the source.

Layout of a directory written by ``save_checkpoint`` (``jaxspec convert``)::

    jaxspec.json      {"format": "jaxspec-orbax", "version": 1, "config": {...ModelConfig...}, "source": ...}
    params/           orbax StandardCheckpointer tree
    tokenizer/        tokenizer files (Tokenizer.save), when the model has a tokenizer

The directory is assembled under a temporary name and renamed into place: an interrupted
conversion leaves no half-written checkpoint behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax

from jaxspec.conversion.atomic import atomic_directory
from jaxspec.models.config import ModelConfig, RopeScaling
from jaxspec.models.transformer import param_shapes, stack_layers

MARKER = "jaxspec.json"
FORMAT = "jaxspec-orbax"


class CheckpointFormatError(ValueError):
    pass


def is_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
    d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
    return ModelConfig(**d)


def save_checkpoint(out_dir: str | os.PathLike, cfg: ModelConfig, params, tokenizer=None, source: str = "") -> Path:
    import orbax.checkpoint as ocp

    with atomic_directory(out_dir, CheckpointFormatError) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", stack_layers(params))
            ckptr.wait_until_finished()
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        meta = {"format": FORMAT, "version": 1, "config": config_to_dict(cfg), "source": source}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2))
    return Path(out_dir).absolute()


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / MARKER).read_text())
    except FileNotFoundError as e:
        raise CheckpointFormatError(f"{path} is not a jaxspec checkpoint (no {MARKER})") from e
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{path / MARKER} is corrupt: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointFormatError(f"{path / MARKER}: unknown format {meta.get('format')!r}")
    return meta


def load_checkpoint_config(path: str | os.PathLike) -> ModelConfig:
    return config_from_dict(_read_meta(Path(path))["config"])


def load_checkpoint(path: str | os.PathLike, shardings=None) -> tuple[ModelConfig, dict, dict]:
    """(config, params, metadata). ``shardings``: optional pytree of shardings to restore onto."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = _read_meta(path)
    cfg = config_from_dict(meta["config"])
    target = param_shapes(cfg)
    if shardings is not None:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / "params", target)
    return cfg, params, meta
