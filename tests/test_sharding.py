"""Sharding: rules and their conflicts, the parameter/cache axis tables, meshes from strings, and — in a
subprocess with 8 host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), so the rest of the
suite keeps one device — sharded loading and generation on meshes 1×8, 2×4 and 8×1 equal to one device
(tokens, and logits within 1e-5), a Qwen-like 2 kv heads on a 4-way model axis, the planner's bytes
against the arrays allocated; and two processes on localhost through ``jax.distributed`` (the CLI's
``--distributed``) generating what one process generates."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

B, NEW = 8, 8  # prompts per batch (data=8 splits it), new tokens
MODELS = {  # name -> ModelConfig kwargs; "wide" divides everything by 8, "qwen" has Qwen2.5's 2 kv heads
    "wide": dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=16, num_kv_heads=8, head_dim=8),
    "qwen": dict(model_type="qwen2", vocab_size=128, hidden_size=48, intermediate_size=64, num_layers=2,
                 num_heads=6, num_kv_heads=2, head_dim=8, qkv_bias=True, tie_word_embeddings=True),
}
RUNS = [  # (model, mesh, layout, source) run on 8 devices
    ("wide", "data=1,model=8", "unstacked", "hf"),
    ("wide", "data=2,model=4", "unstacked", "hf"),
    ("wide", "data=8,model=1", "unstacked", "hf"),
    ("wide", "data=2,model=4", "stacked", "orbax"),
    ("qwen", "data=2,model=4", "unstacked", "hf"),
]
# SpecKV (draft lookahead + SnapKV selection), SpecPC (draft attention -> shorter prompt), draft-model and ADED
# (host-side MCTS through io_callback) speculative decoding
METHODS = ("speckv", "specpc", "speculative", "aded")


def _cfg(name):
    from jaxspec.models import ModelConfig

    return ModelConfig(**MODELS[name])


def _save_model(name: str, out: Path, seed: int = 0) -> Path:
    """A random model saved as an HF directory (loaded back through the sharded ``put`` hook)."""
    import jax

    from jaxspec.conversion.hf import save_hf
    from jaxspec.models import param_shapes

    cfg = _cfg(name)
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(  # norms around 1, everything else large enough to matter
        lambda path, x: (rng.uniform(0.5, 1.5, x.shape) if path[-1].key == "scale" else rng.normal(0, 0.1, x.shape)
                         ).astype(np.float32), param_shapes(cfg))
    save_hf(cfg, params, out)
    return out


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(3, vocab, n).tolist() for n in (5, 17, 9, 3, 20, 12, 7, 14)]


def _logits(model, prompts, steps: int = 2) -> np.ndarray:
    """Last-token logits of a batched prefill and ``steps`` decode steps (fixed fed tokens), in one jit:
    [steps+1, B, V]."""
    import jax
    import jax.numpy as jnp

    from jaxspec import sharding
    from jaxspec.cache import KVCache
    from jaxspec.generation import pad_prompts
    from jaxspec.models import forward

    def run(params, tokens, lengths, cache):
        T = tokens.shape[1]
        pos = jnp.where(jnp.arange(T)[None] < lengths[:, None], jnp.arange(T)[None], -1)
        logits, cache, _ = forward(params, cfg, tokens, pos, cache, last_only=True)
        out = [logits]
        for i in range(steps):
            logits, cache, _ = forward(params, cfg, jnp.full_like(tokens[:, :1], 7 + i), lengths[:, None] + i,
                                       cache, last_only=True)
            out.append(logits)
        return jnp.stack(out)

    cfg, mesh = model.config, model.mesh
    batch = pad_prompts(prompts)
    capacity = batch.tokens.shape[1] + steps
    if mesh is None:
        args = (model.params, batch.tokens, batch.lengths, KVCache.create(cfg, len(prompts), capacity))
    else:
        args = sharding.place_args((model.params, batch.tokens, batch.lengths,
                                    sharding.create_cache(cfg, len(prompts), capacity, mesh)), mesh, batched=(1, 2))
    return sharding.to_host(jax.jit(run)(*args))


def _device_bytes(tree) -> list[int]:
    """Bytes held by each device for the arrays of ``tree``."""
    import jax

    per: dict = {}
    for x in jax.tree.leaves(tree):
        for s in x.addressable_shards:
            per[s.device] = per.get(s.device, 0) + s.data.nbytes
    return sorted(per.values())


def _eight_device_worker(out: Path) -> dict:
    """Runs in the 8-device subprocess: everything the tests below assert on, as JSON-able data."""
    import jax

    import jaxspec
    from jaxspec import sharding
    from jaxspec.conversion.checkpoint import save_checkpoint
    from jaxspec.plan import kv_bytes, param_bytes

    assert jax.device_count() == 8, jax.devices()
    results: dict = {"runs": {}, "ref": {}}
    dirs = {name: _save_model(name, out / name) for name in MODELS}
    wide = jaxspec.load(dirs["wide"], quiet=True)
    orbax = save_checkpoint(out / "wide-orbax", wide.config, wide.params)
    for name, d in dirs.items():
        ref = jaxspec.load(d, quiet=True)
        prompts = _prompts(ref.config.vocab_size)
        results["ref"][name] = {
            "tokens": [r.token_ids for r in jaxspec.generate(ref, prompts, max_new_tokens=NEW, stop_ids=[])],
            "logits": _logits(ref, prompts).tolist(),
        }
    for name, spec, layout, source in RUNS:
        mesh = jaxspec.make_mesh(spec)
        model = jaxspec.load(dirs[name] if source == "hf" else orbax, mesh=mesh, layout=layout, quiet=True)
        prompts = _prompts(model.config.vocab_size)
        cfg, sizes = model.config, dict(mesh.shape)
        cache = sharding.create_cache(cfg, B, 32, mesh)
        flat = jax.tree_util.tree_flatten_with_path(model.params)[0]
        results["runs"][" ".join((name, spec, layout, source))] = {
            "tokens": [r.token_ids for r in jaxspec.generate(model, prompts, max_new_tokens=NEW, stop_ids=[])],
            "logits": _logits(model, prompts).tolist(),
            "specs": {jax.tree_util.keystr(p, simple=True, separator="/"): list(x.sharding.spec) for p, x in flat},
            "cache_spec": list(cache.k.sharding.spec),
            "notes": sharding.sharding_notes(cfg, mesh, batch=B),
            "param_bytes": [_device_bytes(model.params), param_bytes(cfg, sizes)],
            "kv_bytes": [_device_bytes(cache), kv_bytes(cfg, B, 32, sizes)],
        }
    results["methods"] = _methods_worker(dirs)
    results["idle_axis_notes"] = sharding.sharding_notes(_cfg("wide"), jaxspec.make_mesh("data=2,tensor=4"))
    return results


def _methods_worker(dirs: dict) -> dict:
    """method -> (tokens on one device, tokens on data=2,model=4 with the draft replicated). Speculative
    greedy decoding must reproduce plain greedy decoding, so its reference is plain generation."""
    import jaxspec
    from jaxspec.drafters import make_drafter
    from jaxspec.drafters.trigram import TrigramTable
    from jaxspec.kv import SpecKV
    from jaxspec.pc import SpecPC
    from jaxspec.sharding import ShardingRules
    from jaxspec.speculative import generate_speculative

    mesh = jaxspec.make_mesh("data=2,model=4")
    target, draft = (jaxspec.load(dirs["wide"], mesh=mesh, quiet=True),
                     jaxspec.load(dirs["qwen"], mesh=mesh, rules=ShardingRules.replicated(), quiet=True))
    ref_target, ref_draft = jaxspec.load(dirs["wide"], quiet=True), jaxspec.load(dirs["qwen"], quiet=True)
    prompts = _prompts(target.config.vocab_size)
    ids = lambda results: [r.token_ids for r in results]  # noqa: E731
    kv = SpecKV(capacity=8, window_size=2)
    one = jaxspec.generate(ref_target, prompts, max_new_tokens=NEW, stop_ids=[], kv=kv, draft=ref_draft)
    assert one[1].kv["compressed"]  # the 17-token prompt was compressed to 8 entries
    plain = ids(jaxspec.generate(ref_target, prompts, max_new_tokens=NEW, stop_ids=[]))
    spec = generate_speculative(target, prompts, make_drafter("draft-model"), max_new_tokens=NEW, stop_ids=[],
                                draft_model=draft)
    pc = SpecPC(capacity=8, window_size=2, starting_layer_index=0)
    pc_one = jaxspec.generate(ref_target, prompts, max_new_tokens=NEW, stop_ids=[], pc=pc, draft=ref_draft)
    assert pc_one[1].pc["compressed"]
    texts = [list(range(3, 60)) * 2 + p + p for p in prompts]  # a table whose trigrams the prompts reuse
    table = TrigramTable.build(texts, target.config.vocab_size)
    aded = generate_speculative(target, prompts, make_drafter("aded", tree_size=6, table=table), max_new_tokens=NEW,
                                stop_ids=[])
    return {"speckv": [ids(one), ids(jaxspec.generate(target, prompts, max_new_tokens=NEW, stop_ids=[], kv=kv,
                                                      draft=draft))],
            "specpc": [ids(pc_one), ids(jaxspec.generate(target, prompts, max_new_tokens=NEW, stop_ids=[], pc=pc,
                                                         draft=draft))],
            "speculative": [plain, ids(spec)],
            "aded": [plain, ids(aded)]}


def _xla_flags(extra: str) -> str:
    """This process's XLA flags (the suite's compile settings, see conftest) plus ``extra``, for a subprocess."""
    return (os.environ.get("XLA_FLAGS", "") + " " + extra).strip()


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    """Run ``_eight_device_worker`` once in a subprocess with 8 host devices."""
    out = tmp_path_factory.mktemp("eight")
    env = dict(os.environ, XLA_FLAGS=_xla_flags("--xla_force_host_platform_device_count=8"),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__, "eight", str(out)], env=env, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow  # the 8-device run takes ~3 min on 2 cores (.ci/run runs it)
@pytest.mark.parametrize("method", METHODS)
def test_kv_compression_and_speculative_decoding_sharded(eight, method):
    one_device, sharded = eight["methods"][method]
    assert sharded == one_device


@pytest.mark.slow  # the 8-device run takes ~3 min on 2 cores (.ci/run runs it)
@pytest.mark.parametrize("run", [" ".join(r) for r in RUNS])
def test_meshes_generate_what_one_device_generates(eight, run):
    name = run.split()[0]
    got, ref = eight["runs"][run], eight["ref"][name]
    assert got["tokens"] == ref["tokens"]
    logits, want = np.asarray(got["logits"]), np.asarray(ref["logits"])
    assert np.abs(want).max() > 1  # logits that mean something
    np.testing.assert_allclose(logits, want, atol=1e-5, rtol=0)


@pytest.mark.slow  # the 8-device run takes ~3 min on 2 cores (.ci/run runs it)
def test_params_and_cache_are_really_split(eight):
    runs = eight["runs"]
    specs = runs["wide data=1,model=8 unstacked hf"]["specs"]
    assert specs["layers_0/self_attn/q_proj/weight"] == ["model", None]
    assert specs["layers_1/mlp/down_proj/weight"] == [None, "model"]
    assert specs["embed_tokens/embedding"] == ["model", None]
    assert specs["norm/scale"] == [None]
    stacked = runs["wide data=2,model=4 stacked orbax"]["specs"]
    assert stacked["layers/self_attn/k_proj/weight"] == [None, "model", None]
    assert runs["wide data=2,model=4 unstacked hf"]["cache_spec"] == [None, "data", "model", None, None]
    assert runs["wide data=8,model=1 unstacked hf"]["cache_spec"] == [None, "data", None, None, None]
    for run in runs.values():  # every device holds an equal share
        assert len(set(run["param_bytes"][0])) == len(set(run["kv_bytes"][0])) == 1


@pytest.mark.slow  # the 8-device run takes ~3 min on 2 cores (.ci/run runs it)
def test_qwen_like_two_kv_heads_on_model_4_replicate_kv_and_say_so(eight):
    run = eight["runs"]["qwen data=2,model=4 unstacked hf"]
    assert run["specs"]["layers_0/self_attn/k_proj/weight"] == [None, None]
    assert run["specs"]["layers_0/mlp/gate_proj/weight"] == ["model", None]  # 64 ffw units split
    assert run["cache_spec"] == [None, "data", None, None, None]  # batch still split
    kv_note = [n for n in run["notes"] if n.startswith("kv_heads (2) does not divide over model=4: replicated")]
    assert kv_note and "cache/k" in kv_note[0] and "layers/self_attn/v_proj/weight" in kv_note[0]
    assert any(n.startswith("q_heads (6) does not divide over model=4") for n in run["notes"])


@pytest.mark.slow  # the 8-device run takes ~3 min on 2 cores (.ci/run runs it)
def test_planner_bytes_equal_the_allocated_shards(eight):
    for run in eight["runs"].values():
        (allocated, planned), (kv_allocated, kv_planned) = run["param_bytes"], run["kv_bytes"]
        assert allocated[-1] == planned
        assert kv_allocated[-1] == kv_planned


@pytest.mark.slow  # the 8-device run takes ~3 min on 2 cores (.ci/run runs it)
def test_mesh_axis_no_rule_uses_is_reported(eight):
    assert eight["idle_axis_notes"] == ["mesh axes tensor=4 are used by no sharding rule: everything is replicated "
                                        "over them"]


# ------------------------------------------------------------------------------------------ one device
def test_rules_raise_on_conflicts():
    from jaxspec.sharding import ShardingError, ShardingRules

    with pytest.raises(ShardingError, match="'vocab' and 'embed' both map to mesh axis 'model'"):
        ShardingRules(embed="model")  # FSDP-style embed collides with vocab (and q_heads, ffw) on weights
    ShardingRules(embed="model", vocab=None, q_heads=None, kv_heads=None, ffw=None)  # FSDP is expressible
    with pytest.raises(ShardingError, match="'batch' and 'kv_heads'"):
        ShardingRules(batch="model")  # the KV cache has both
    with pytest.raises(ShardingError, match="'batch' and 'kv_heads'"):
        ShardingRules(batch=("data", "model"))
    rules = ShardingRules(q_heads="data")  # fine for the declared arrays, but not for this one:
    with pytest.raises(ShardingError, match="both map to mesh axis 'data'"):
        rules.spec(("batch", "q_heads"), (8, 8), {"data": 2})
    with pytest.raises(ShardingError, match="unknown logical axis"):
        ShardingRules().spec(("seq",), (8,), {"data": 2})


@pytest.mark.parametrize("family", ["llama-tied", "qwen2-bias", "qwen3-qknorm"])
def test_every_leaf_has_axes_in_both_layouts(family):
    import jax
    from jax.sharding import PartitionSpec as P

    from jaxspec.conversion.hf import flatten
    from jaxspec.models import ModelConfig, param_shapes
    from jaxspec.models.transformer import unstack_layers
    from jaxspec.sharding import param_specs

    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
              head_dim=8)
    cfg = {"llama-tied": ModelConfig("llama", tie_word_embeddings=True, **kw),
           "qwen2-bias": ModelConfig("qwen2", qkv_bias=True, **kw),
           "qwen3-qknorm": ModelConfig("qwen3", qk_norm=True, **kw)}[family]
    sizes = {"data": 2, "model": 2}
    shapes = param_shapes(cfg)
    per_layer = jax.eval_shape(unstack_layers, shapes)
    stacked = flatten(param_specs(shapes, cfg, sizes))
    unstacked = flatten(param_specs(per_layer, cfg, sizes))
    assert len(unstacked) == len(flatten(per_layer)) > len(stacked)
    for path, spec in unstacked.items():  # a per-layer weight is split like its stacked parent, minus the L axis
        layer, _, rest = path.partition("/")
        want = stacked[path] if path in stacked else P(*tuple(stacked[f"layers/{rest}"])[1:])
        assert tuple(spec) == tuple(want), path
    assert stacked["layers/self_attn/o_proj/weight"] == P(None, None, "model")
    assert stacked["embed_tokens/embedding"] == P("model", None)
    if family == "qwen2-bias":
        assert stacked["layers/self_attn/k_proj/bias"] == P(None, "model")
    if family == "qwen3-qknorm":
        assert stacked["layers/self_attn/q_norm/scale"] == P(None, None)


def test_unknown_parameter_path_is_an_error():
    from jaxspec.sharding import ShardingError, param_axes

    assert param_axes("layers_12/mlp/up_proj/weight") == ("ffw", "embed")
    assert param_axes("layers/mlp/up_proj/weight") == ("layers", "ffw", "embed")
    for bad in ("mlp/up_proj/weight", "layers/mlp/up_proj/kernel", "layers_x/mlp/up_proj/weight"):
        with pytest.raises(ShardingError, match="no logical axes"):
            param_axes(bad)


def test_parse_mesh():
    from jaxspec.sharding import ShardingError, parse_mesh

    assert parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
    assert parse_mesh("data=2, model=-1", 8) == {"data": 2, "model": 4}
    assert parse_mesh(None) == {"data": 1, "model": 1}
    assert parse_mesh(None, 8) == {"data": 1, "model": 8}  # one process: every device on model
    for bad in ("data=2,data=2", "model=0", "model", "data=-1,model=-1", "data=2;model=4"):
        with pytest.raises(ShardingError):
            parse_mesh(bad, 8)
    with pytest.raises(ShardingError, match="cannot infer"):
        parse_mesh("data=3,model=-1", 8)


def test_gguf_leaves_are_placed_one_by_one_as_they_are_dequantised():
    """``load_gguf(put_for=...)``: every parameter leaf goes through the placement hook (a mesh load uses
    ``sharding.param_put`` there), with the path the sharding rules know, and the result is unchanged."""
    import jax

    from conftest import shared_asset
    from jaxspec.conversion.gguf import load_gguf
    from jaxspec.sharding import param_axes

    path = shared_asset("tinyllamas/tinyllamas-stories-260k-f32.gguf")
    seen = []

    def put_for(cfg):
        def put(leaf, a):
            assert isinstance(a, np.ndarray)  # host data: never a whole device array first
            param_axes(leaf)  # a path the sharding rules declare
            seen.append(leaf)
            return jax.numpy.asarray(a)
        return put

    cfg, params, _ = load_gguf(path, put_for=put_for)
    _, plain, _ = load_gguf(path)
    flat = {jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert sorted(seen) == sorted(flat)
    jax.tree.map(np.testing.assert_array_equal, params, plain)


def test_one_device_mesh_loads_and_generates_like_no_mesh(tmp_path):
    import jaxspec
    from jaxspec.sharding import ShardingError, make_mesh

    d = _save_model("qwen", tmp_path / "m")
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    with pytest.raises(ShardingError, match="needs 2 devices"):
        make_mesh("model=2")
    prompts = _prompts(128)[:2]
    plain = jaxspec.generate(jaxspec.load(d, quiet=True), prompts, max_new_tokens=5, stop_ids=[])
    sharded = jaxspec.generate(jaxspec.load(d, mesh=mesh, quiet=True), prompts, max_new_tokens=5, stop_ids=[])
    assert [r.token_ids for r in sharded] == [r.token_ids for r in plain]


# ------------------------------------------------------------------------------------------ two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra", [[], ["--kv", "snapkv", "--capacity", "8", "--window", "2"],
                                   ["--speculative", "ngram", "--tree-size", "4"]], ids=["plain", "snapkv", "ngram"])
def test_two_processes_generate_what_one_process_generates(tmp_path, extra):
    """``jaxspec generate --distributed``: 2 processes × 2 CPU devices, the model axis spanning both
    processes (gloo collectives), give the tokens of one plain process — plainly, with a compressed KV cache
    (against SnapKV on one process) and with speculative decoding (against plain greedy decoding)."""
    import jaxspec
    from jaxspec.kv import SnapKV

    d = _save_model("wide", tmp_path / "m")
    prompt = _prompts(128)[1]
    kw = {"kv": SnapKV(capacity=8, window_size=2)} if "--kv" in extra else {}
    one = jaxspec.generate(jaxspec.load(d, quiet=True), prompt, max_new_tokens=NEW, stop_ids=[], **kw)
    if kw:
        assert one.kv["compressed"]
    want = one.token_ids
    env = dict(os.environ, XLA_FLAGS=_xla_flags("--xla_force_host_platform_device_count=2"),
               JAX_PLATFORMS="cpu")
    port = _free_port()
    cmd = [sys.executable, "-m", "jaxspec.cli", "generate", "--model", str(d), "--prompt-ids",
           ",".join(map(str, prompt)), "--max-new-tokens", str(NEW), "--stop-ids=", "--json", "--mesh", "model=4",
           "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", *extra]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    printed = [[line for line in out.splitlines() if line.startswith("{")] for out, _ in outs]  # (gloo logs too)
    assert len(printed[0]) == 1 and printed[1] == []  # only process 0 prints the result
    assert json.loads(printed[0][0])["token_ids"] == want


if __name__ == "__main__":  # the 8-device worker: python tests/test_sharding.py eight OUT_DIR
    assert sys.argv[1] == "eight"
    sys.path.insert(0, str(Path(__file__).parent))
    out_dir = Path(sys.argv[2])
    (out_dir / "results.json").write_text(json.dumps(_eight_device_worker(out_dir)))
