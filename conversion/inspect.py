"""Describe a checkpoint without loading its weights: format, config, tensor names, dtypes, shapes.

``jaxspec inspect PATH`` and ``python -m jaxspec.conversion.inspect PATH`` print it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from jaxspec.models.config import ModelConfig


def _hf(path: Path) -> dict:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    tensors = []
    for f in files:
        with safe_open(f, framework="numpy") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                tensors.append({"name": k, "dtype": sl.get_dtype(), "shape": list(sl.get_shape()), "file": f.name})
    cfg = ModelConfig.from_hf_config(path)
    return {"format": "hf-safetensors", "config": dataclasses.asdict(cfg), "tensors": tensors}


def _orbax(path: Path) -> dict:
    from jaxspec.conversion.checkpoint import load_checkpoint_config
    from jaxspec.conversion.hf import flatten
    from jaxspec.models.transformer import param_shapes

    cfg = load_checkpoint_config(path)
    tensors = [{"name": k, "dtype": str(v.dtype), "shape": list(v.shape)}
               for k, v in flatten(param_shapes(cfg)).items()]
    return {"format": "jaxspec-orbax", "config": dataclasses.asdict(cfg), "tensors": tensors}


def _gguf(path: Path) -> dict:
    from jaxspec.conversion.gguf import GGUFFile, config_from_gguf

    f = GGUFFile(path)
    tensors = [{"name": t.name, "dtype": t.ggml_type.name, "shape": list(t.shape)} for t in f.tensors.values()]
    return {"format": f"gguf v{f.version}", "config": dataclasses.asdict(config_from_gguf(f.metadata, f.tensors)),
            "metadata": {k: v for k, v in f.metadata.items() if not isinstance(v, list) or len(v) <= 16},
            "tensors": tensors}


def inspect_path(path: str | os.PathLike) -> dict:
    from jaxspec.conversion.checkpoint import is_checkpoint

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or directory: {p}")
    if p.is_file():
        return _gguf(p)
    if is_checkpoint(p):
        return _orbax(p)
    return _hf(p)


if __name__ == "__main__":
    print(json.dumps(inspect_path(sys.argv[1]), indent=2, default=str))
