"""Memory planner: its param and KV bytes equal the bytes of the arrays jaxspec actually allocates (one
device here; sharded meshes in tests/test_sharding.py), configs read from every format without weights,
the KV-compressed cache, fits / does not fit, and the CLI."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import jaxspec
from jaxspec.api import InputError
from jaxspec.cache import KVCache
from jaxspec.cli import main
from jaxspec.models import ModelConfig, init_params
from jaxspec.plan import parse_bytes, plan, read_config

TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=8)


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def _params(cfg):
    """Real parameter arrays (jitted init: eager flax init is slow)."""
    return jax.jit(init_params, static_argnums=0)(cfg)


@pytest.mark.parametrize("cfg", [ModelConfig("qwen2", qkv_bias=True, **TINY),
                                 ModelConfig("qwen3", qk_norm=True, tie_word_embeddings=True, **TINY),
                                 ModelConfig("llama", dtype="bfloat16", param_dtype="bfloat16", **TINY)],
                         ids=["qwen2", "qwen3-tied", "llama-bf16"])
def test_param_and_kv_bytes_equal_the_allocated_arrays(cfg):
    p = plan(cfg, batch=3, context=40, new_tokens=9)
    assert p["per_device"]["params"] == _nbytes(_params(cfg))
    assert p["per_device"]["kv_full"] == KVCache.create(cfg, 3, 49).nbytes()
    assert p["devices"] == 1 and p["fits"] is None


def test_model_parallel_divides_what_divides():
    cfg = ModelConfig("qwen2", qkv_bias=True, **TINY)
    one, four = plan(cfg, batch=2, context=64), plan(cfg, batch=2, context=64, mesh="data=2,model=4")
    # 2 kv heads do not divide over 4: the cache is split by batch only, and the planner says so
    assert four["per_device"]["kv_full"] == (one["per_device"]["kv_full"] - 2 * 4) // 2 + 4  # length [B] too
    assert any(n.startswith("kv_heads (2) does not divide over model=4") for n in four["notes"])
    assert any(n.startswith("vocab (101) does not divide over model=4") for n in four["notes"])
    assert four["per_device"]["params"] < one["per_device"]["params"]


def test_configs_are_read_from_every_format_without_weights(tmp_path, tiny_hf, monkeypatch):
    from test_gguf import _tiny_hf, _write_gguf

    from jaxspec.conversion.checkpoint import save_checkpoint
    from jaxspec.conversion.gguf import load_gguf
    from jaxspec.fetch import REGISTRY

    d, _ = tiny_hf("qwen2-bias")
    cfg = ModelConfig.from_hf_config(d)
    assert read_config(d) == cfg
    assert read_config(d, "bfloat16") == cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    model = jaxspec.load(d, layout="stacked", quiet=True)
    assert read_config(save_checkpoint(tmp_path / "ckpt", model.config, model.params)) == cfg
    gguf_path = _write_gguf(tmp_path / "m.gguf", "qwen2", _tiny_hf("qwen2"))
    gcfg, gparams, _ = load_gguf(gguf_path)
    assert read_config(gguf_path) == gcfg
    assert plan(gcfg, batch=1, context=8)["per_device"]["params"] == _nbytes(gparams)
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path / "empty-cache"))
    name = next(n for n, e in REGISTRY.items() if e.kind == "model")
    with pytest.raises(InputError, match=f"jaxspec fetch {name}"):
        read_config(name)


def test_compressed_cache_bytes_equal_the_compressed_cache(tiny_hf):
    from jaxspec.kv import SnapKV, SpecKVOracle, compress

    d, _ = tiny_hf("qwen2-bias")
    model = jaxspec.load(d, quiet=True)
    prompts = [list(np.random.default_rng(0).integers(3, 101, 40)), list(range(3, 30))]
    for kv in (SnapKV(capacity=12, window_size=4), SpecKVOracle(capacity=12, window_size=4, lookahead_tokens=4)):
        c = compress(model, prompts, kv)
        p = plan(model.config, batch=2, context=40, kv=kv)
        assert p["kv_slots"] == 12 + kv.lookahead  # SpecKV re-feeds the final prompt token
        assert p["per_device"]["kv_compressed"] == c.cache.nbytes()
        assert p["peak"] > p["decode"]


def test_draft_is_replicated_and_fits_is_judged():
    cfg, draft = ModelConfig("llama", **TINY), ModelConfig("llama", **dict(TINY, num_layers=1))
    p = plan(cfg, batch=4, context=100, mesh="data=2,model=2", draft=draft, device_memory=parse_bytes("1GiB"))
    assert p["per_device"]["draft_params"] == _nbytes(_params(draft))
    assert p["per_device"]["draft_kv"] == KVCache.create(draft, 4, 100).nbytes()
    assert p["fits"] is True
    assert plan(cfg, batch=4, context=100, device_memory=p["peak"] - 1)["fits"] is False


def test_parse_bytes():
    assert parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1.5 MiB") == 3 * 2**19
    assert parse_bytes("4096") == 4096
    with pytest.raises(InputError):
        parse_bytes("16 parsecs")


def test_cli(tiny_hf, capsys):
    d, _ = tiny_hf("qwen2-bias")
    args = ["plan", "--model", str(d), "--context", "64", "--batch", "2", "--mesh", "data=2,model=4"]
    assert main(args + ["--kv", "snapkv", "--capacity", "48", "--device-memory", "1KiB", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["fits"] is False and p["mesh"] == {"data": 2, "model": 4} and p["kv_slots"] == 48
    assert p["per_device"]["kv_compressed"] < p["per_device"]["kv_full"]
    assert main(args + ["--device-memory", "16GiB"]) == 0
    text = capsys.readouterr().out
    assert "fits in 16.00 GiB per device" in text and "note: kv_heads (2) does not divide" in text
    assert main(args + ["--capacity", "16"]) == 2  # --capacity without --kv
    assert "needs --kv" in capsys.readouterr().err
