"""GGUF files → jaxspec ``(ModelConfig, params)``.

Three layers, each usable alone:

1. **Reading** (:class:`GGUFFile`): one bounds-checked parser for GGUF versions 1–3 (they differ only
   in the width of counts and lengths: uint32 in v1, uint64 after). Files are untrusted: every
   count, length and offset is checked against the file size before it is used, so a truncated or
   corrupt file raises :class:`GGUFError` instead of an IndexError, a MemoryError, a hang or a
   silent short read. The file is mapped read-only with ``np.memmap``; tensor bytes are not read
   until a tensor is dequantised. (The PyPI ``gguf`` package's ``GGUFReader`` refuses v1 and does
   not bounds-check, so only its constants and dequantisers are used here.)
2. **Dequantisation** (:func:`dequantize`): the ``gguf`` package's vectorised numpy dequantisers,
   applied in row chunks, for the types in :data:`DEQUANT_TYPES`; any other type is a
   :class:`GGUFError` naming type and tensor.
3. **Mapping** (:func:`load_gguf`): metadata → :class:`ModelConfig`, and tensors → the parameter
   tree of ``jaxspec.models.transformer`` by the table :data:`TENSOR_MAP`; per-layer tensors are
   stacked on a leading ``[L]`` axis, matrices stay ``(out, in)`` (our layout too), and for
   arch ``llama`` the q/k rows are permuted from llama.cpp's adjacent-pair RoPE layout to rotate-half.
"""

from __future__ import annotations

import os
import struct
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from jaxspec.models.config import ConfigError, ModelConfig, RopeScaling
from jaxspec.models.transformer import param_shapes

__all__ = [
    "DEQUANT_TYPES",
    "SUPPORTED_ARCHS",
    "TENSOR_MAP",
    "TensorRule",
    "GGUFError",
    "GGUFFile",
    "GGUFTensor",
    "config_from_gguf",
    "dequantize",
    "inspect_gguf",
    "load_gguf",
    "read_gguf_metadata",
]

Q = GGMLQuantizationType
DEQUANT_TYPES = frozenset(
    {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K}
)
SUPPORTED_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # GGUF arch → model_type


class GGUFError(ValueError):
    """A GGUF file that is corrupt, truncated, or that jaxspec cannot turn into a model."""


class GGUFTensor(NamedTuple):
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # row-major (GGUF lists dimensions innermost first; this is reversed)
    data: np.ndarray  # raw bytes: a read-only uint8 view of the mapped file


# ----------------------------------------------------------------------------------------- reading
_MAGIC = b"GGUF"
_MAX_DIMS = 4
_MAX_NESTING = 8
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_GGML_TYPE_IDS = frozenset(int(q) for q in GGMLQuantizationType)
_FLOAT32, _BOOL, _STRING, _ARRAY = 6, 7, 8, 9
_SCALARS = {
    t: struct.Struct(f)
    for t, f in {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q",
                 11: "<q", 12: "<d"}.items()
}
_NP_TYPES = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "u1", 10: "<u8",
             11: "<i8", 12: "<f8"}


class _Header:
    """Little-endian cursor over the mapped file; every read is checked against the file size."""

    def __init__(self, buf: memoryview, path: str, version: int, pos: int):
        self.buf, self.path, self.pos, self.size = buf, path, pos, len(buf)
        self.len_struct = _U32 if version == 1 else _U64  # counts and string/array lengths

    def fail(self, msg: str):
        raise GGUFError(f"{self.path}: corrupt or truncated GGUF: {msg}")

    def unpack(self, st: struct.Struct, what: str):
        if self.pos + st.size > self.size:
            self.fail(f"{what} at offset {self.pos} runs past the end of the file ({self.size} bytes)")
        value = st.unpack_from(self.buf, self.pos)[0]
        self.pos += st.size
        return value

    def count(self, what: str, min_item_bytes: int) -> int:
        """A count or length, rejected unless that many items of at least ``min_item_bytes`` fit."""
        n = self.unpack(self.len_struct, what)
        if n * min_item_bytes > self.size - self.pos:
            self.fail(f"{what} {n} at offset {self.pos} does not fit in the remaining "
                      f"{self.size - self.pos} bytes")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"{what} length", 1)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at offset {self.pos - n} is not valid UTF-8")

    def min_bytes(self, vtype: int, what: str) -> int:
        if vtype in _SCALARS:
            return _SCALARS[vtype].size
        if vtype == _STRING:
            return self.len_struct.size
        if vtype == _ARRAY:
            return 4 + self.len_struct.size
        self.fail(f"{what} has unknown value type {vtype}")

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """One metadata value: python scalar, str, or list (numeric arrays read in one go)."""
        if vtype in _SCALARS:
            v = self.unpack(_SCALARS[vtype], what)
            if vtype == _FLOAT32:  # the shortest decimal that round-trips: 1e-06, not 9.99999997e-07
                return float(str(np.float32(v)))
            return bool(v) if vtype == _BOOL else v
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            self.fail(f"{what} has unknown value type {vtype}")
        if depth >= _MAX_NESTING:
            self.fail(f"{what} nests arrays deeper than {_MAX_NESTING}")
        itype = self.unpack(_U32, f"{what} item type")
        n = self.count(f"{what} array length", self.min_bytes(itype, what))
        if itype in _NP_TYPES:
            arr = np.frombuffer(self.buf, _NP_TYPES[itype], n, self.pos)
            self.pos += arr.nbytes
            return (arr != 0).tolist() if itype == _BOOL else arr.tolist()
        return [self.value(itype, what, depth + 1) for _ in range(n)]


class GGUFFile:
    """A parsed GGUF file: ``version``, ``metadata`` (key → python value, arrays as lists) and
    ``tensors`` (name → :class:`GGUFTensor`, in file order). Tensor bytes stay in the read-only
    mapping until used."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        if size < 8:
            raise GGUFError(f"{self.path}: not a GGUF file ({size} bytes)")
        # a plain ndarray view of the mapping: slices of a np.memmap subclass are slow to make
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r").view(np.ndarray)
        buf = memoryview(self._map)
        if bytes(buf[:4]) != _MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        self.version = _U32.unpack_from(buf, 4)[0]
        if self.version & 0xFFFF == 0:
            raise GGUFError(f"{self.path}: big-endian GGUF is not supported")
        if self.version not in (1, 2, 3):
            raise GGUFError(f"{self.path}: unsupported GGUF version {self.version}; supported: 1, 2, 3")
        h = _Header(buf, self.path, self.version, 8)
        ls = h.len_struct.size
        n_tensors = h.count("tensor count", ls + 4 + 4 + 8)  # name length, n_dims, type, offset
        n_kv = h.count("metadata count", ls + 4 + 1)  # key length, value type, smallest value

        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = h.string("metadata key")
            if key in self.metadata:
                h.fail(f"duplicate metadata key {key!r}")
            self.metadata[key] = h.value(h.unpack(_U32, f"type of {key!r}"), repr(key))

        infos = []
        for _ in range(n_tensors):
            name = h.string("tensor name")
            n_dims = h.unpack(_U32, f"n_dims of tensor {name!r}")
            if not 1 <= n_dims <= _MAX_DIMS:
                h.fail(f"tensor {name!r} has {n_dims} dimensions (1..{_MAX_DIMS} allowed)")
            dims = [h.unpack(h.len_struct, f"shape of tensor {name!r}") for _ in range(n_dims)]
            type_id = h.unpack(_U32, f"type of tensor {name!r}")
            offset = h.unpack(_U64, f"offset of tensor {name!r}")
            infos.append((name, dims, type_id, offset))

        align = self.metadata.get("general.alignment", 32)
        if not (isinstance(align, int) and align > 0 and align & (align - 1) == 0):
            h.fail(f"general.alignment {align!r} is not a power of two")
        data_start = -(-h.pos // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, type_id, offset in infos:
            if name in self.tensors:
                h.fail(f"duplicate tensor {name!r}")
            if type_id not in _GGML_TYPE_IDS:
                h.fail(f"tensor {name!r} has unknown ggml type id {type_id}")
            gtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[gtype]
            if dims[0] % block:
                h.fail(f"tensor {name!r} ({gtype.name}): row length {dims[0]} is not a multiple of "
                       f"the block size {block}")
            nbytes = int(np.prod(dims, dtype=object)) // block * type_size
            start = data_start + offset
            if offset % align or start + nbytes > size:
                h.fail(f"tensor {name!r} data [{start}, {start + nbytes}) is misaligned or lies "
                       f"beyond the end of the file ({size} bytes)")
            shape = tuple(int(d) for d in reversed(dims))
            self.tensors[name] = GGUFTensor(name, gtype, shape, self._map[start : start + nbytes])


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata dict only (parses the header; reads no tensor data)."""
    return GGUFFile(path).metadata


def inspect_gguf(path: str | os.PathLike) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(name, ggml type name, row-major shape)`` for every tensor, in file order."""
    return [(t.name, t.ggml_type.name, t.shape) for t in GGUFFile(path).tensors.values()]


# ---------------------------------------------------------------------------------- dequantisation
_CHUNK_ELEMS = 1 << 17  # rows per chunk ≈ this many values: big enough to amortise numpy call
# overhead, small enough to stay in cache (≈5x faster than gguf.quants.dequantize's 16-row groups)
_ROW_DEQUANT = {q: getattr(quants, q.name).dequantize_rows for q in DEQUANT_TYPES - {Q.F32, Q.F16}}


def _row_chunks(t: GGUFTensor):
    """Yield ``(row slice, float32 [rows, t.shape[-1]])`` over ``t`` viewed as a 2-D matrix."""
    if t.ggml_type not in DEQUANT_TYPES:
        raise GGUFError(
            f"tensor {t.name!r} has ggml type {t.ggml_type.name}, which jaxspec cannot dequantise; "
            f"supported: {', '.join(sorted(q.name for q in DEQUANT_TYPES))}"
        )
    block, type_size = GGML_QUANT_SIZES[t.ggml_type]
    row_len = t.shape[-1]
    raw = t.data.reshape(int(np.prod(t.shape[:-1])), row_len // block * type_size)
    step = max(1, _CHUNK_ELEMS // max(row_len, 1))
    for r in range(0, raw.shape[0], step):
        part = raw[r : r + step]
        if t.ggml_type == Q.F32:
            values = part.view(np.float32)
        elif t.ggml_type == Q.F16:
            values = part.view(np.float16).astype(np.float32)
        else:
            values = _ROW_DEQUANT[t.ggml_type](part)
        yield slice(r, r + step), values


def dequantize(t: GGUFTensor) -> np.ndarray:
    """The tensor as a new float32 array of ``t.shape`` (vectorised numpy, chunk by chunk)."""
    out = np.empty(t.shape, np.float32)
    flat = out.reshape(-1, t.shape[-1])
    for rows, values in _row_chunks(t):
        flat[rows] = values
    return out


# ----------------------------------------------------------------------------------------- mapping
class TensorRule(NamedTuple):
    gguf: str  # tensor name; "{i}" = layer index (stacked on a leading [L] axis)
    path: tuple[str, ...]  # where it goes in the parameter tree
    rope_heads: str | None = None  # arch llama: undo the adjacent-pair RoPE row order, per head


TENSOR_MAP: tuple[TensorRule, ...] = (
    TensorRule("token_embd.weight", ("embed_tokens", "embedding")),
    TensorRule("blk.{i}.attn_norm.weight", ("layers", "input_layernorm", "scale")),
    TensorRule("blk.{i}.attn_q.weight", ("layers", "self_attn", "q_proj", "weight"), "num_heads"),
    TensorRule("blk.{i}.attn_k.weight", ("layers", "self_attn", "k_proj", "weight"), "num_kv_heads"),
    TensorRule("blk.{i}.attn_v.weight", ("layers", "self_attn", "v_proj", "weight")),
    TensorRule("blk.{i}.attn_q.bias", ("layers", "self_attn", "q_proj", "bias"), "num_heads"),
    TensorRule("blk.{i}.attn_k.bias", ("layers", "self_attn", "k_proj", "bias"), "num_kv_heads"),
    TensorRule("blk.{i}.attn_v.bias", ("layers", "self_attn", "v_proj", "bias")),
    TensorRule("blk.{i}.attn_q_norm.weight", ("layers", "self_attn", "q_norm", "scale")),
    TensorRule("blk.{i}.attn_k_norm.weight", ("layers", "self_attn", "k_norm", "scale")),
    TensorRule("blk.{i}.attn_output.weight", ("layers", "self_attn", "o_proj", "weight")),
    TensorRule("blk.{i}.ffn_norm.weight", ("layers", "post_attention_layernorm", "scale")),
    TensorRule("blk.{i}.ffn_gate.weight", ("layers", "mlp", "gate_proj", "weight")),
    TensorRule("blk.{i}.ffn_up.weight", ("layers", "mlp", "up_proj", "weight")),
    TensorRule("blk.{i}.ffn_down.weight", ("layers", "mlp", "down_proj", "weight")),
    TensorRule("output_norm.weight", ("norm", "scale")),
    TensorRule("output.weight", ("lm_head", "weight")),  # absent from the tree when tied
)
_PERMUTED_ARCHS = ("llama",)  # llama.cpp stores q/k of these in Meta's adjacent-pair RoPE layout


def _rotate_half_order(n_rows: int, n_heads: int) -> np.ndarray:
    """Destination row of each q/k row (weight or bias). Meta's RoPE rotates rows (2j, 2j+1) of a
    head together, rotate-half rotates (j, j + hd/2): source row (h, j, p) goes to (h, p, j)."""
    hd = n_rows // n_heads
    return np.arange(n_rows).reshape(n_heads, 2, hd // 2).swapaxes(1, 2).reshape(-1)


def _fill(dst: np.ndarray, t: GGUFTensor, order: np.ndarray | None) -> None:
    """Dequantise ``t`` into ``dst`` (shaped like ``t``) chunk by chunk, moving source row ``r`` to
    row ``order[r]``."""
    if len(t.shape) == 1:
        dst[slice(None) if order is None else order] = dequantize(t)
        return
    for rows, values in _row_chunks(t):
        dst[rows if order is None else order[rows]] = values


def _meta(meta: dict[str, Any], key: str, kind: type, default: Any = ...) -> Any:
    if key not in meta:
        if default is ...:
            raise GGUFError(f"GGUF metadata lacks required key {key!r}")
        return default
    v = meta[key]
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
        raise GGUFError(f"GGUF metadata {key!r} = {v!r} is not a single {kind.__name__}")
    return kind(v)


def _same_tensor(a: GGUFTensor, b: GGUFTensor) -> bool:
    return a.ggml_type == b.ggml_type and a.shape == b.shape and np.array_equal(a.data, b.data)


def config_from_gguf(
    meta: dict[str, Any], tensors: dict[str, GGUFTensor], dtype: str = "float32"
) -> ModelConfig:
    """ModelConfig from GGUF metadata and the tensor index. Weights are tied when ``output.weight``
    is absent or byte-identical to ``token_embd.weight``; ``dtype`` sets activations and params."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    if "rope_freqs.weight" in tensors:
        raise GGUFError("rope_freqs.weight (Llama-3.1-style RoPE scaling factors) is not supported")
    if "token_embd.weight" not in tensors:
        raise GGUFError("GGUF lacks tensor 'token_embd.weight'")
    a = f"{arch}."
    hidden = _meta(meta, a + "embedding_length", int)
    heads = _meta(meta, a + "attention.head_count", int)
    head_dim = _meta(meta, a + "attention.key_length", int, hidden // heads)
    rope_dims = _meta(meta, a + "rope.dimension_count", int, head_dim)
    if rope_dims != head_dim:
        raise GGUFError(f"partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported")
    scaling = meta.get(a + "rope.scaling.type", "none")
    if scaling == "linear":
        rope_scaling = RopeScaling(kind="linear", factor=_meta(meta, a + "rope.scaling.factor", float))
    elif scaling == "none":
        rope_scaling = RopeScaling()
    else:
        raise GGUFError(f"unsupported RoPE scaling {scaling!r}; supported: none, linear")
    eos = [meta.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    output = tensors.get("output.weight")
    tied = output is None or _same_tensor(output, tensors["token_embd.weight"])
    try:
        return ModelConfig(
            model_type=SUPPORTED_ARCHS[arch],
            vocab_size=tensors["token_embd.weight"].shape[0],
            hidden_size=hidden,
            intermediate_size=_meta(meta, a + "feed_forward_length", int),
            num_layers=_meta(meta, a + "block_count", int),
            num_heads=heads,
            num_kv_heads=_meta(meta, a + "attention.head_count_kv", int, heads),
            head_dim=head_dim,
            max_position_embeddings=_meta(meta, a + "context_length", int, 4096),
            rms_norm_eps=_meta(meta, a + "attention.layer_norm_rms_epsilon", float),
            rope_theta=_meta(meta, a + "rope.freq_base", float, 10000.0),
            rope_scaling=rope_scaling,
            tie_word_embeddings=tied,
            qkv_bias="blk.0.attn_q.bias" in tensors,
            qk_norm=arch == "qwen3",
            bos_token_id=_meta(meta, "tokenizer.ggml.bos_token_id", int, None),
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if isinstance(e, int))),
            pad_token_id=_meta(meta, "tokenizer.ggml.padding_token_id", int, None),
            dtype=dtype,
            param_dtype=dtype,
        )
    except ConfigError as e:
        raise GGUFError(f"GGUF metadata describes an invalid model: {e}") from e


def _build_params(f: GGUFFile, cfg: ModelConfig, put=None) -> dict[str, Any]:
    """Fill the model's parameter tree rule by rule, one tensor dequantised at a time; ``put(path, array)``
    places each finished leaf ("a/b/c" path; default ``jnp.asarray``)."""
    put = put or (lambda path, a: jnp.asarray(a))
    shapes = param_shapes(cfg)
    permute = f.metadata["general.architecture"] in _PERMUTED_ARCHS
    params: dict[str, Any] = {}
    for rule in TENSOR_MAP:
        node = shapes
        for key in rule.path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:  # not part of this model (bias, q/k norm, untied head)
            continue
        stacked = "{i}" in rule.gguf
        one_shape = node.shape[1:] if stacked else node.shape
        want = tuple(one_shape)
        out = np.empty(node.shape, cfg.jnp_param_dtype)
        for i in range(cfg.num_layers) if stacked else (None,):
            name = rule.gguf.format(i=i)
            t = f.tensors.get(name)
            if t is None:
                raise GGUFError(f"{f.path}: missing tensor {name!r}")
            if t.shape != want:
                raise GGUFError(f"{f.path}: tensor {name!r} has shape {t.shape}, expected {want}")
            order = None
            if permute and rule.rope_heads:
                order = _rotate_half_order(t.shape[0], getattr(cfg, rule.rope_heads))
            _fill(out[i] if stacked else out, t, order)
        sub = params
        for key in rule.path[:-1]:
            sub = sub.setdefault(key, {})
        sub[rule.path[-1]] = put("/".join(rule.path), out)
        del out  # at most one stacked host array alive besides the device params
    return params


def load_gguf(
    path: str | os.PathLike, dtype: str = "float32", put_for=None
) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """Load a llama / qwen2 / qwen3 GGUF: ``(config, params, metadata)``. Weights are dequantised
    to float32 and cast to ``dtype`` (which also becomes the activation dtype of the config).
    ``put_for(cfg)`` (optional) returns the ``put(path, array)`` hook that places each leaf as soon as it is
    dequantised — e.g. straight onto its ``NamedSharding`` (``jaxspec.sharding.param_put``), so a sharded
    load never holds the whole model on one device."""
    f = GGUFFile(path)
    cfg = config_from_gguf(f.metadata, f.tensors, dtype)
    return cfg, _build_params(f, cfg, None if put_for is None else put_for(cfg)), f.metadata
