"""Export/import round trips and the bad-input errors of loading and generation."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import jaxspec
from jaxspec.api import InputError
from jaxspec.cache import KVCache
from jaxspec.cli import main as cli
from jaxspec.conversion.checkpoint import load_checkpoint, save_checkpoint
from jaxspec.conversion.hf import CheckpointError, load_hf, save_hf
from jaxspec.models import ConfigError, ModelConfig, forward


def _logits(cfg, params, ids):
    return np.asarray(forward(params, cfg, jnp.asarray(ids), jnp.arange(ids.shape[1])[None],
                              KVCache.create(cfg, 1, ids.shape[1]))[0])


@pytest.mark.parametrize("name", ["qwen3-qknorm-headdim", "llama-gqa4to2-untied-llama3rope"])
def test_export_round_trip_loads_in_transformers(tiny_hf, tmp_path, name):
    import transformers

    d, _ = tiny_hf(name)
    cfg, params = load_hf(d)
    out = save_hf(cfg, params, tmp_path / "export")
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 20))
    with torch.no_grad():
        theirs = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_logits(cfg, params, ids), theirs, atol=1e-4)
    cfg2, params2 = load_hf(out)
    assert cfg2 == cfg


def test_orbax_round_trip(tiny_hf, tmp_path):
    d, _ = tiny_hf("qwen2-bias")
    cfg, params = load_hf(d)
    save_checkpoint(tmp_path / "ck", cfg, params)
    cfg2, params2, _ = load_checkpoint(tmp_path / "ck")
    assert cfg2 == cfg
    ids = np.arange(5, 25)[None]
    np.testing.assert_array_equal(_logits(cfg, params, ids), _logits(cfg2, params2, ids))
    with pytest.raises(Exception, match="not empty"):
        save_checkpoint(tmp_path / "ck", cfg, params)


def test_cli_convert_then_generate_same_tokens(tiny_hf, tmp_path, capsys):
    d, _ = tiny_hf("llama-gqa4to1-tied")
    assert cli(["convert", str(d), "--out", str(tmp_path / "ck")]) == 0
    outs = []
    for m in (d, tmp_path / "ck"):
        capsys.readouterr()
        assert cli(["generate", "--model", str(m), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6", "--json"]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0]["token_ids"] == outs[1]["token_ids"] and len(outs[0]["token_ids"]) == 6
    assert set(outs[0]) >= {"token_ids", "text", "finish_reason", "prompt_tokens", "timings", "tokens_per_second"}
    assert set(outs[0]["timings"]) >= {"load", "compile", "prefill", "decode"}


# ----------------------------------------------------------------------------- errors

def _copy(tiny_hf, tmp_path, name="qwen2-bias"):
    d, _ = tiny_hf(name)
    dst = tmp_path / "m"
    shutil.copytree(d, dst)
    return dst


def test_unknown_model_type_lists_supported(tiny_hf, tmp_path):
    d = _copy(tiny_hf, tmp_path)
    c = json.loads((d / "config.json").read_text())
    c["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConfigError, match="gpt_neox.*llama, qwen2, qwen3"):
        jaxspec.load(d)


def test_missing_config_and_weights(tiny_hf, tmp_path):
    d = _copy(tiny_hf, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match="missing config.json"):
        jaxspec.load(d)
    d2 = _copy(tiny_hf, tmp_path / "b")
    (d2 / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        jaxspec.load(d2)
    (d2 / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="never unpickles"):
        jaxspec.load(d2)


def test_missing_or_misshapen_tensor_is_named(tiny_hf, tmp_path):
    d = _copy(tiny_hf, tmp_path)
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        jaxspec.load(d)
    sd["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"up_proj\.weight.*\(3, 3\).*expected \(48, 32\)"):
        jaxspec.load(d)


def test_prompt_errors(tiny_hf, capsys):
    d, _ = tiny_hf("qwen2-bias")
    model = jaxspec.load(d)
    for empty in ("", [[]]):
        with pytest.raises(InputError, match="empty prompt"):
            jaxspec.generate(model, empty)
    with pytest.raises(InputError, match="no prompts"):
        jaxspec.generate(model, [])
    with pytest.raises(InputError, match="integers in"):
        jaxspec.generate(model, [1, 2, model.config.vocab_size])
    with pytest.raises(InputError, match="longer than the model's context"):
        jaxspec.generate(model, [1] * (model.config.max_position_embeddings + 1))
    with pytest.raises(InputError, match="no tokenizer"):
        jaxspec.generate(model, "hello")
    assert cli(["generate", "--model", str(d)]) == 2
    assert "exactly one of --prompt and --prompt-ids" in capsys.readouterr().err
    assert cli(["generate", "--model", str(d), "--prompt", "x", "--prompt-ids", "1"]) == 2
    assert cli(["generate", "--model", str(d), "--prompt-ids", "1,a"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert cli(["generate", "--model", str(d), "--prompt-ids", "1.5"]) == 2


def test_sharded_safetensors_with_index(tiny_hf, tmp_path):
    d, ref = tiny_hf("llama-gqa4to2-untied-llama3rope")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    cfg, params = load_hf(tmp_path / "sharded")
    cfg1, params1 = load_hf(d)
    ids = np.arange(3, 23)[None]
    np.testing.assert_array_equal(_logits(cfg, params, ids), _logits(cfg1, params1, ids))


def test_config_reads_both_rope_schemas():
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hub = ModelConfig.from_hf_config(dict(base, rope_theta=500000.0, rope_scaling=scaling))
    v5 = ModelConfig.from_hf_config(dict(base, rope_parameters=dict(scaling, rope_theta=500000.0)))
    assert hub == v5
    assert hub.rope_theta == 500000.0 and hub.rope_scaling.kind == "llama3" and hub.rope_scaling.factor == 8.0
    plain = ModelConfig.from_hf_config(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert plain.rope_theta == 1e6 and plain.rope_scaling.kind == "none"
