"""Write a directory atomically: build it under a temporary sibling name, rename it into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, error: type[Exception] = FileExistsError) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out_dir`` when the block succeeds; on any failure
    (an exception, Ctrl-C) it is removed and ``out_dir`` is left as it was. ``out_dir`` must be absent
    or empty (else ``error`` is raised)."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise error(f"output directory {out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
