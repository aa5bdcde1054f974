"""Writing outputs whole or not at all: a file or a folder is built under a hidden temporary name beside its
final place and renamed when complete, so a crash or a user error never leaves a half-written file, run,
model or data folder behind. The temporary sits in the same folder: a rename is atomic only within one
filesystem.

Every writer of medseg goes through `atomic_file` (or `write_text_atomic`) and `atomic_folder`.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _temporary(final: Path, kind: str) -> Path:
    """A hidden unique name beside `final`: .NAME.<random>.KIND"""
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.{kind}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final` for the block to write; when the block ends without an error the
    file becomes `final` in one rename (replacing an existing file), otherwise it is removed.

        with atomic_file("out/matrix.npy") as tmp, tmp.open("wb") as stream:
            np.save(stream, matrix)

    The temporary name ends in `.tmp`, not in `final`'s suffix: write through a stream or name the format."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(final, "tmp")
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written to the temporary file of {final}")
        os.replace(tmp, final)
    finally:
        _remove(tmp)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_file`: readers never see half a file."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_folder(final: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside `final`; when the block ends without an error it becomes `final` in
    one rename, otherwise it is deleted. With `replace`, an existing `final` is first renamed aside and deleted
    once the new folder is in place (put back if that rename fails)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if replace and (final.exists() or final.is_symlink()):
            retired = _temporary(final, "old")
            os.replace(final, retired)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(retired, final)
                raise
            _remove(retired)
        else:
            os.replace(tmp, final)
    finally:
        _remove(tmp)
