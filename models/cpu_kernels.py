"""CPU kernels for XLA:CPU, as XLA FFI calls (``rows_matmul.cc`` next to this file): a small-M fp32 matmul
and the decode attention's reads of the KV cache.

XLA:CPU runs ``x[1, K] @ w[N, K].T`` as a mat-vec near the memory bandwidth, but 2-32 rows as a GEMM that
packs weight panels and runs at a fraction of it: a 9-token speculative verification cost ~4 decode steps
(docs/results.md, "Speculative decoding"). ``rows_matmul`` reads each weight row once for all rows of ``x``.
``Linear`` and the tied-embedding logits use it on the CPU backend for fp32 operands of at most
``ROWS_MAX`` rows; everything else (prefill, other backends, other dtypes) stays an XLA dot.

Decode attention against a long cache is the same small-row shape (a kv group's query heads x new tokens
against ``S`` cached keys of ``head_dim`` floats), which XLA:CPU's dots read at ~2 GB/s. ``cache_scores`` and
``cache_values`` compute it from the whole-model cache buffer and a layer index (a layer sliced out for a
custom call would be copied); ``models.transformer.attend`` uses them for fp32 caches and at most
``ATTN_ROWS_MAX`` query rows a kv group.

The kernels are compiled on first use with the C++ compiler found (``$CXX``, else ``c++``/``g++``/``clang++``)
against the running jaxlib's FFI headers, for this CPU (``-march=native``), into
``$JAXSPEC_CACHE/kernels`` (default ``~/.cache/jaxspec/kernels``) under a name that hashes the source,
jaxlib's version, the compiler, the build flags and the CPU's flags, written atomically; later processes load it. Without a
compiler, or if the build fails, models fall back to XLA's dots with one warning (the results are the same up
to summation order). They are on where they win (``suited``): both with AVX-512, the small-row matmul also
with AVX2; ``JAXSPEC_CPU_KERNELS=0`` turns them off, ``=1`` on anywhere (read when a function is traced).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

ROWS_MAX = 32  # rows of x up to which the kernel beats XLA:CPU's GEMM (experiments/bench_matmul_layout.py)
ATTN_ROWS_MAX = 64  # query rows (a kv group's heads x new tokens) up to which the cache-attention kernels run
TARGET = "jaxspec_rows_matmul"
SCORES, VALUES = "jaxspec_cache_scores", "jaxspec_cache_values"
SOURCE = Path(__file__).with_name("rows_matmul.cc")
# Contraction off: the source fuses its multiply-adds itself (``madd``), the same way in every block shape.
FLAGS = ("-O3", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", "-w")

_lock = threading.Lock()
_state: dict = {"loaded": None, "error": None}  # loaded: None = not tried, True/False after the first try


def enabled(kind: str = "matmul") -> bool:
    """Whether the ``kind`` kernels (``matmul``: ``rows_matmul``; ``attention``: ``cache_scores`` and
    ``cache_values``) are on: ``JAXSPEC_CPU_KERNELS=1`` forces both on, ``0`` off; unset (or ``auto``) means
    on where they win (``suited(kind)``)."""
    mode = os.environ.get("JAXSPEC_CPU_KERNELS", "auto")
    return mode == "1" or (mode not in ("0", "1") and suited(kind))


def suited(kind: str = "matmul") -> bool:
    """Whether the ``kind`` kernels beat XLA's dots on this CPU, as measured (``experiments/bench_matmul_layout.py``,
    ``bench_decode_attention.py``; docs/results.md): both with AVX-512 (``avx512f``); the small-row matmul also
    with AVX2 + FMA, which the library is then built for (4 x 3 blocks of 8-lane vectors); the attention
    kernels' 16-lane tiles lost to XLA there at a 4K cache (0.82x) and only tied at 1K."""
    if kind not in ("matmul", "attention"):
        raise ValueError(f"unknown kernel kind {kind!r}: 'matmul' or 'attention'")
    flags = set(_cpu_flags().split())
    return "avx512f" in flags or (kind == "matmul" and {"avx2", "fma"} <= flags)


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CXX"), "c++", "g++", "clang++")):
        if shutil.which(name):
            return name
    return None


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path(cxx: str) -> Path:
    """Where the kernel built by ``cxx`` for this source, jaxlib and CPU lives."""
    import jaxlib

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, *version, *FLAGS, _cpu_flags()]).encode())
    root = Path(os.environ.get("JAXSPEC_CACHE", "~/.cache/jaxspec")).expanduser() / "kernels"
    return root / f"rows_matmul-{key.hexdigest()[:16]}.so"


def build(cxx: str, out: Path) -> None:
    """Compile the kernel into ``out`` (atomically: a temp file renamed). Raises ``RuntimeError`` with the
    compiler's message on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    base = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    try:
        for flags in (["-march=native"], []):  # -march=native is not known to every compiler/target
            done = subprocess.run(base[:1] + flags + base[1:], capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(tmp, out)
                return
        raise RuntimeError(f"{cxx} failed to build {SOURCE.name}:\n{done.stderr[-2000:]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load() -> bool:
    """Build (first time on this machine), load and register the kernel; False, with one warning, if that is
    not possible."""
    with _lock:
        if _state["loaded"] is None:
            try:
                cxx = _compiler()
                if cxx is None:
                    raise RuntimeError("no C++ compiler found (set $CXX)")
                path = library_path(cxx)
                if not path.exists():
                    build(cxx, path)
                lib = ctypes.cdll.LoadLibrary(str(path))
                for name in (TARGET, SCORES, VALUES):
                    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
                _state["loaded"] = True
            except Exception as e:  # noqa: BLE001 - any failure means: use XLA's dot
                _state.update(loaded=False, error=f"{type(e).__name__}: {e}")
                warnings.warn(f"jaxspec's CPU kernels are unavailable, using XLA's dots (slower speculative "
                              f"verification, batched and long-context decode): {_state['error']}",
                              RuntimeWarning, stacklevel=3)
        return _state["loaded"]


def rows_matmul(x, w):
    """``x[..., K] @ w[N, K].T`` in fp32 by the kernel (CPU backend; call ``load()`` first)."""
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (w.shape[0],), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(x, w)


def use_kernel(x, w) -> bool:
    """Whether ``project(x, w)`` takes the kernel: fp32 operands, at most ``ROWS_MAX`` rows, a 2-D weight, the
    CPU backend, the kernel enabled and loadable."""
    return (x.dtype == jnp.float32 and w.dtype == jnp.float32 and w.ndim == 2
            and math.prod(x.shape[:-1]) <= ROWS_MAX and jax.default_backend() == "cpu" and enabled("matmul")
            and load())


def project(x, w):
    """``x[..., K] @ w[N, K].T``: the kernel where ``use_kernel`` says so, else an XLA dot."""
    if use_kernel(x, w):
        return rows_matmul(x, w)
    return lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


def cache_scores(q, k, at):
    """``q [P, M, D]`` against the keys of block ``at`` of a cache buffer ``k [..., P, S, D]`` -> fp32 ``[P, M,
    S]`` (CPU backend; call ``load()`` first). The buffer is read in place: no slice of it is copied."""
    out = jax.ShapeDtypeStruct(q.shape[:2] + (k.shape[-2],), jnp.float32)
    return jax.ffi.ffi_call(SCORES, out, vmap_method="sequential")(q, k, jnp.asarray(at, jnp.int32))


def cache_values(w, v, at):
    """Weights ``w [P, M, S]`` times the values of block ``at`` of a cache buffer ``v [..., P, S, D]`` -> fp32
    ``[P, M, D]``, read in place as in ``cache_scores``."""
    out = jax.ShapeDtypeStruct(w.shape[:2] + (v.shape[-1],), jnp.float32)
    return jax.ffi.ffi_call(VALUES, out, vmap_method="sequential")(w, v, jnp.asarray(at, jnp.int32))


def use_cache_kernels(rows: int, *operands) -> bool:
    """Whether decode attention of ``rows`` query rows a kv group reads the cache through ``cache_scores`` and
    ``cache_values``: fp32 ``operands``, at most ``ATTN_ROWS_MAX`` rows, the CPU backend, the kernels enabled
    and loadable."""
    return (all(x.dtype == jnp.float32 for x in operands) and rows <= ATTN_ROWS_MAX
            and jax.default_backend() == "cpu" and enabled("attention") and load())
