"""Writing outputs whole or not at all: a file or a folder is built under a hidden temporary name beside its
final place and renamed when complete, so a crash or a user error never leaves a half-written file, run,
model or data folder behind. The temporary sits in the same folder: a rename is atomic only within one
filesystem. A writer killed with -9 cannot clean up: its temporary carries its pid, and the next writer of
the same output deletes temporaries whose process is gone.

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
    """A hidden unique name beside `final`: .NAME.<pid>-<random>.KIND (the pid tells a stale one)."""
    return final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.{kind}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Delete the temporaries of `final` left by killed writers (their process is gone) and return them; those
    of a writer still running are kept."""
    removed = []
    for candidate in final.parent.glob(f".{glob_escape(final.name)}.*-*.*"):
        pid = candidate.name[len(final.name) + 2:].split("-", 1)[0]
        if candidate.suffix in (".tmp", ".old") and pid.isdigit() and not _alive(int(pid)):
            _remove(candidate)
            removed.append(candidate)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


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
    remove_stale_temporaries(final)
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
    remove_stale_temporaries(final)
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
