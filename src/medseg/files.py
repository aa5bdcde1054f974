"""Writing outputs whole or not at all: a folder is built under a hidden temporary name beside its final
place and renamed when complete, so a crash or a user error never leaves a half-written run, model or
data folder behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_folder(final: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; when the block ends without an error it becomes `final` in
    one rename (an existing `final` is removed first when `replace`), otherwise it is deleted."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if replace and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
