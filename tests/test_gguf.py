"""GGUF reading, dequantisation and mapping (conversion/gguf.py).

Golden: stories260K (GGUF v1, ../shared/assets) greedy-decodes to llama2.c's expected text.
Synthetic: tiny random HF Llama / Qwen2 / Qwen3 models written to GGUF in llama.cpp's layout
(q/k permuted to Meta's RoPE order for ``llama``, quantised with ``gguf.quants``) load into jaxspec
with the torch model's logits. Real (``-m real``): cached GGUFs against transformers' own GGUF loader.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from jaxspec.cache import KVCache
from jaxspec.conversion.gguf import (
    GGUFError,
    GGUFFile,
    GGUFTensor,
    dequantize,
    inspect_gguf,
    load_gguf,
    read_gguf_metadata,
)
from jaxspec.models import forward

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY = SHARED / "assets" / "tinyllamas"
STORIES = TINY / "tinyllamas-stories-260k-f32.gguf"


def _stories() -> Path:
    if not STORIES.is_file():
        pytest.skip(f"../shared/assets absent ({STORIES} not found)")
    return STORIES


def _logits(params, cfg, ids) -> np.ndarray:
    """Full-sequence logits [T, V] for one row of token ids, from an empty cache."""
    T = len(ids)
    cache = KVCache.create(cfg, batch=1, capacity=T)
    run = jax.jit(lambda p, t, pos, c: forward(p, cfg, t, pos, c)[0])
    out = run(params, jnp.asarray([ids], jnp.int32), jnp.arange(T, dtype=jnp.int32)[None], cache)
    return np.asarray(out[0])


# ------------------------------------------------------------------------------ stories260K (v1)
def _decode_pieces(pieces: list[str], ids: list[int]) -> bytes:
    """SentencePiece-style piece join: U+2581 is a space, <0xNN> a raw byte; the first piece's
    leading space (the one the tokenizer adds after BOS) is dropped."""
    out = bytearray()
    for n, i in enumerate(ids):
        p = pieces[i]
        if len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
            out.append(int(p[3:5], 16))
            continue
        text = p.replace("\u2581", " ")
        out += (text[1:] if n == 0 and text.startswith(" ") else text).encode()
    return bytes(out)


def test_stories260k_config_and_inspect():
    path = _stories()
    cfg, params, meta = load_gguf(path)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_layers) == ("llama", 64, 5)
    assert (cfg.num_heads, cfg.num_kv_heads) == (8, 4)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.head_dim) == (172, 512, 8)
    assert cfg.tie_word_embeddings and "lm_head" not in params  # output.weight == token_embd.weight
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    assert (cfg.rms_norm_eps, cfg.rope_theta) == (1e-5, 10000.0)
    assert params["layers"]["self_attn"]["k_proj"]["weight"].shape == (5, 32, 64)
    assert read_gguf_metadata(path) == meta
    assert GGUFFile(path).version == 1
    cfg16, params16, _ = load_gguf(path, dtype="bfloat16")
    assert cfg16 == cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params16)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))
    listing = inspect_gguf(path)
    assert len(listing) == 48 and listing[0] == ("token_embd.weight", "F32", (512, 64))
    assert ("blk.0.ffn_down.weight", "F32", (64, 172)) in listing


def test_stories260k_greedy_matches_golden():
    path = _stories()
    expected = (TINY / "stories260K_greedy200_expected.txt").read_bytes()
    cfg, params, meta = load_gguf(path)
    cache = KVCache.create(cfg, batch=1, capacity=200)
    step = jax.jit(lambda p, tok, pos, c: forward(p, cfg, tok, pos, c, last_only=True)[:2])
    token, ids = 1, []  # BOS at position 0
    for pos in range(200):
        logits, cache = step(params, jnp.asarray([[token]]), jnp.asarray([[pos]]), cache)
        token = int(jnp.argmax(logits[0]))
        if token == 1:
            break
        ids.append(token)
    assert _decode_pieces(meta["tokenizer.ggml.tokens"], ids) == expected


# ------------------------------------------------------------------------------- dequantisation
def _tensor(qtype: Q, shape: tuple[int, ...], raw: np.ndarray) -> GGUFTensor:
    return GGUFTensor("t", qtype, shape, np.ascontiguousarray(raw).reshape(-1).view(np.uint8))


SIMPLE_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
MAX_ERR = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 0.02, Q.Q5_0: 0.1, Q.Q5_1: 0.1, Q.Q4_0: 0.2,
           Q.Q4_1: 0.2}  # relative to max |x|


@pytest.mark.parametrize("qtype", SIMPLE_TYPES, ids=lambda q: q.name)
def test_quantize_then_dequantize(qtype):
    """gguf.quants.quantize → our chunked dequantiser: equal to the package's own dequantiser
    (across several chunks) and close to the original values."""
    x = np.random.default_rng(0).standard_normal((1200, 256)).astype(np.float32)  # > 2 chunks
    q = gguf.quants.quantize(x, qtype)
    ours = dequantize(_tensor(qtype, x.shape, q))
    assert ours.dtype == np.float32 and ours.shape == x.shape
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(q, qtype))
    assert np.abs(ours - x).max() <= MAX_ERR[qtype] * np.abs(x).max()


def _scale_min_k4(j: int, s: np.ndarray) -> tuple[int, int]:
    """ggml get_scale_min_k4: 6-bit scale and min number j of a K-quant block's 12 scale bytes."""
    s = s.astype(int)
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def _ref_q4_k(b: np.ndarray) -> list[float]:  # transcribed from ggml dequantize_row_q4_K
    d, dmin = b[:4].view(np.float16).astype(float)
    scales, q, y = b[4:16], b[16:144].astype(int), []
    for j in range(4):
        (s1, m1), (s2, m2) = _scale_min_k4(2 * j, scales), _scale_min_k4(2 * j + 1, scales)
        qs = q[32 * j : 32 * j + 32]
        y += [d * s1 * (v & 0xF) - dmin * m1 for v in qs] + [d * s2 * (v >> 4) - dmin * m2 for v in qs]
    return y


def _ref_q5_k(b: np.ndarray) -> list[float]:  # ggml dequantize_row_q5_K
    d, dmin = b[:4].view(np.float16).astype(float)
    scales, qh, q, y = b[4:16], b[16:48].astype(int), b[48:176].astype(int), []
    for j in range(4):
        (s1, m1), (s2, m2) = _scale_min_k4(2 * j, scales), _scale_min_k4(2 * j + 1, scales)
        qs, u1, u2 = q[32 * j : 32 * j + 32], 1 << (2 * j), 2 << (2 * j)
        y += [d * s1 * ((v & 0xF) + (16 if h & u1 else 0)) - dmin * m1 for v, h in zip(qs, qh)]
        y += [d * s2 * ((v >> 4) + (16 if h & u2 else 0)) - dmin * m2 for v, h in zip(qs, qh)]
    return y


def _ref_q6_k(b: np.ndarray) -> list[float]:  # ggml dequantize_row_q6_K
    ql, qh, sc = b[:128].astype(int), b[128:192].astype(int), b[192:208].view(np.int8).astype(int)
    d = float(b[208:210].view(np.float16)[0])
    y = [0.0] * 256
    for n in range(2):
        L, H, S = ql[64 * n :], qh[32 * n :], sc[8 * n :]
        for i in range(32):
            k = i // 16
            q1 = ((L[i] & 0xF) | ((H[i] & 3) << 4)) - 32
            q2 = ((L[i + 32] & 0xF) | (((H[i] >> 2) & 3) << 4)) - 32
            q3 = ((L[i] >> 4) | (((H[i] >> 4) & 3) << 4)) - 32
            q4 = ((L[i + 32] >> 4) | (((H[i] >> 6) & 3) << 4)) - 32
            for off, qv, s in ((0, q1, S[k]), (32, q2, S[k + 2]), (64, q3, S[k + 4]), (96, q4, S[k + 6])):
                y[128 * n + off + i] = d * s * qv
    return y


@pytest.mark.parametrize(
    "qtype, ref, f16_fields",
    [(Q.Q4_K, _ref_q4_k, (0, 2)), (Q.Q5_K, _ref_q5_k, (0, 2)), (Q.Q6_K, _ref_q6_k, (208,))],
    ids=["Q4_K", "Q5_K", "Q6_K"],
)
def test_k_quants_against_scalar_reference(qtype, ref, f16_fields):
    """Hand-built random blocks (sane f16 scales) against a scalar transcription of ggml's C."""
    rng = np.random.default_rng(1)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (6, type_size), dtype=np.uint8)
    for off in f16_fields:
        blocks[:, off : off + 2] = rng.uniform(0.01, 0.1, (6, 1)).astype(np.float16).view(np.uint8)
    ours = dequantize(_tensor(qtype, (3, 512), blocks))
    want = np.array([ref(b) for b in blocks], np.float64).reshape(3, 512)
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-6)
    big = rng.integers(0, 256, (700, 4 * type_size), dtype=np.uint8)  # several chunks
    for off in f16_fields:
        big.reshape(-1, type_size)[:, off : off + 2] = np.array([0.05], np.float16).view(np.uint8)
    want_big = gguf.quants.dequantize(big, qtype)
    np.testing.assert_array_equal(dequantize(_tensor(qtype, (700, 1024), big)), want_big)


def test_unsupported_type_names_type_and_tensor():
    with pytest.raises(GGUFError, match=r"'t' has ggml type Q2_K.*supported: .*Q4_K"):
        dequantize(_tensor(Q.Q2_K, (1, 256), np.zeros(84, np.uint8)))


# ----------------------------------------------------------------- synthetic HF model → GGUF
_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def _tiny_hf(arch: str):
    """A tiny random torch model of ``arch`` with every parameter randomised (norms around 1)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **common, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False))
    else:  # head_dim 32 != hidden / heads: exercises {arch}.attention.key_length
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            **common, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model.eval()


def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _meta_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``permute``: HF rotate-half rows → Meta adjacent pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, arch: str, model, qtypes=(Q.F32,), override=None, skip=()):
    """Write ``model`` as a llama.cpp-style GGUF. 2-D weights cycle through ``qtypes`` and the
    torch model gets the dequantised values back, so both sides hold identical weights.
    ``override`` maps a tensor name to (qtype, raw data); names in ``skip`` are left out."""
    import torch

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(_head_dim(c))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    state, n_matrices = {}, 0
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{_HF_TO_GGUF[module]}.{kind}"
        else:
            gname = top[name]
        if gname in skip:
            continue
        if override and gname in override:
            qtype, raw = override[gname]
            w.add_tensor(gname, raw, raw_dtype=None if qtype == Q.F32 else qtype)
            continue
        x = p.numpy().astype(np.float32)
        qtype = qtypes[n_matrices % len(qtypes)] if x.ndim == 2 else Q.F32
        n_matrices += x.ndim == 2
        q = gguf.quants.quantize(x, qtype)
        state[name] = torch.from_numpy(gguf.quants.dequantize(q, qtype).reshape(x.shape).copy())
        # quantisation blocks lie within rows, so permuting quantised rows is exact
        if arch == "llama" and ".attn_q." in gname:
            q = _meta_permute(q, c.num_attention_heads)
        if arch == "llama" and ".attn_k." in gname:
            q = _meta_permute(q, c.num_key_value_heads)
        w.add_tensor(gname, q, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model.load_state_dict(state, strict=False)
    return path


@pytest.mark.parametrize("qtypes", [(Q.F32,), tuple(SIMPLE_TYPES)], ids=["f32", "mixed-quant"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_synthetic_model_matches_torch(tmp_path, arch, qtypes):
    import torch

    model = _tiny_hf(arch)
    path = _write_gguf(tmp_path / f"{arch}.gguf", arch, model, qtypes)
    cfg, params, _ = load_gguf(path)
    hf = model.config
    assert cfg.model_type == arch and cfg.vocab_size == 96 and cfg.head_dim == _head_dim(hf)
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings and cfg.qkv_bias == (arch == "qwen2")
    assert (cfg.rms_norm_eps, cfg.rope_theta) == (hf.rms_norm_eps, hf.rope_parameters["rope_theta"])
    ids = list(np.random.default_rng(2).integers(0, 96, 24))
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(want).max() > 1  # a meaningful comparison, not all-near-zero logits
    np.testing.assert_allclose(_logits(params, cfg, ids), want, atol=1e-4, rtol=0)


def test_own_reader_agrees_with_gguf_package(tmp_path):
    """On a v3 file the pure bounds-checked reader sees what gguf.GGUFReader sees."""
    path = _write_gguf(tmp_path / "m.gguf", "qwen2", _tiny_hf("qwen2"), tuple(SIMPLE_TYPES))
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.version == 3
    fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == fields.keys()
    for k, v in fields.items():
        assert ours.metadata[k] == pytest.approx(v), k
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.ggml_type == t.tensor_type and mine.shape == tuple(int(d) for d in t.shape[::-1])
        assert mine.data.tobytes() == t.data.tobytes()


# --------------------------------------------------------------------------------- bad files
def test_truncated_files_raise(tmp_path):
    data = _stories().read_bytes()
    for cut in (0, 3, 7, 12, 30, 200, 3000, 6000, len(data) // 2, len(data) - 1):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(GGUFError):
            load_gguf(p)


@pytest.mark.parametrize(
    "offset, value, fmt",
    [(8, 0xFFFFFFFF, "<I"), (12, 0xFFFFFFFF, "<I"), (16, 0xFFFFFFFF, "<I"), (16, 0x7FFFFFF, "<I"),
     (40, 99, "<I")],
    ids=["tensor-count", "kv-count", "key-length", "key-length-past-eof", "value-type"],
)
def test_corrupt_v1_header_counts(tmp_path, offset, value, fmt):
    data = bytearray(_stories().read_bytes())
    struct.pack_into(fmt, data, offset, value)
    (tmp_path / "bad.gguf").write_bytes(data)
    with pytest.raises(GGUFError, match="corrupt or truncated"):
        read_gguf_metadata(tmp_path / "bad.gguf")


def test_corrupt_v3_header_counts(tmp_path):
    """Huge u64 counts/lengths in a v3 file fail fast with GGUFError (no MemoryError, no hang)."""
    path = _write_gguf(tmp_path / "m.gguf", "llama", _tiny_hf("llama"))
    data = path.read_bytes()
    first_key = data.index(b"general.architecture")  # its u64 length precedes it
    for offset in (8, 16, first_key - 8):
        bad = bytearray(data)
        struct.pack_into("<Q", bad, offset, 1 << 62)
        (tmp_path / "bad.gguf").write_bytes(bad)
        with pytest.raises(GGUFError, match="does not fit"):
            read_gguf_metadata(tmp_path / "bad.gguf")
    bad = bytearray(data)
    bad[:4] = b"GGUG"
    (tmp_path / "bad.gguf").write_bytes(bad)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf_metadata(tmp_path / "bad.gguf")


def test_unknown_arch_lists_supported(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="'gpt2'; supported: llama, qwen2, qwen3"):
        load_gguf(tmp_path / "gpt2.gguf")


def test_unsupported_quant_type_in_model(tmp_path):
    iq4_nl = np.zeros((96, 36), np.uint8)  # a valid layout (block 32, 18 bytes) jaxspec cannot dequantise
    path = _write_gguf(tmp_path / "m.gguf", "qwen2", _tiny_hf("qwen2"),
                       override={"token_embd.weight": (Q.IQ4_NL, iq4_nl)})
    assert ("token_embd.weight", "IQ4_NL", (96, 64)) in inspect_gguf(path)
    with pytest.raises(GGUFError, match="'token_embd.weight' has ggml type IQ4_NL"):
        load_gguf(path)


@pytest.mark.parametrize(
    "case, match",
    [("missing", "missing tensor 'blk.1.ffn_down.weight'"),
     ("shape", r"'blk.0.attn_k.weight' has shape \(64, 32\), expected \(32, 64\)")],
)
def test_missing_or_misshapen_tensor(tmp_path, case, match):
    model = _tiny_hf("llama")
    if case == "missing":
        path = _write_gguf(tmp_path / "m.gguf", "llama", model, skip={"blk.1.ffn_down.weight"})
    else:
        k = model.model.layers[0].self_attn.k_proj.weight.detach().numpy().T.copy()  # [in, out]: wrong
        path = _write_gguf(tmp_path / "m.gguf", "llama", model,
                           override={"blk.0.attn_k.weight": (Q.F32, k)})
    with pytest.raises(GGUFError, match=match):
        load_gguf(path)
