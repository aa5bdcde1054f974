"""Writing outputs whole or not at all: a file or a folder is built under a hidden temporary name beside its
final place and renamed when complete, so a crash or a user error never leaves a half-written file, run,
model or data folder behind. The temporary sits in the same folder: a rename is atomic only within one
filesystem. A writer killed with -9 cannot clean up: its temporary carries its pid, and the next writer of
the same output deletes temporaries whose process is gone.

Every writer of medseg goes through `atomic_file` (or `write_text_atomic`) and `atomic_folder`; every command
checks its output paths with `check_output_folder` / `check_output_file` before any work.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from medseg.errors import MedsegError


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


TEMPORARY_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{12}\.(?:tmp|old)")
# Folders whose stale temporaries were removed at once (`stale_removed_once`): their writers skip the search.
_SWEPT: set[str] = set()


def remove_stale_temporaries_in(folder: Path) -> list[Path]:
    """`remove_stale_temporaries` for every output in `folder` at once, in one listing."""
    removed = []
    for candidate in folder.iterdir() if folder.is_dir() else []:
        match = TEMPORARY_NAME.fullmatch(candidate.name)
        if match and not _alive(int(match["pid"])):
            _remove(candidate)
            removed.append(candidate)
    return removed


@contextmanager
def stale_removed_once(folder: Path) -> Iterator[None]:
    """Inside the block, files written into `folder` skip the search for stale temporaries, removed once at its
    start: a writer of many files would otherwise list the folder once per file (quadratic in their number)."""
    remove_stale_temporaries_in(folder)
    key = os.path.abspath(folder)
    _SWEPT.add(key)
    try:
        yield
    finally:
        _SWEPT.discard(key)


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
    if os.path.abspath(final.parent) not in _SWEPT:
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
    if os.path.abspath(final.parent) not in _SWEPT:
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


# errno values of a write that fails for a reason outside medseg (full disk, quota, permissions, read-only mount):
# the user's to fix, so the CLI names them in one line instead of a traceback.
USER_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def final_name(path: str | Path) -> Path:
    """The output a temporary of `atomic_file` / `atomic_folder` stands for (.NAME.<pid>-<hex>.tmp -> NAME); any
    other path unchanged. An error message names the file the user asked for, not its hidden temporary."""
    path = Path(path)
    match = re.fullmatch(r"\.(.+)\.\d+-[0-9a-f]{12}\.(?:tmp|old)", path.name)
    return path.with_name(match.group(1)) if match else path


def write_error_message(exc: OSError) -> str:
    """One line for a failed write: which output, why, what to do."""
    where = f" {final_name(exc.filename)}" if exc.filename else ""
    reason = exc.strerror or type(exc).__name__
    advice = {errno.ENOSPC: "free disk space or write elsewhere", errno.EDQUOT: "free quota or write elsewhere",
              errno.EFBIG: "write elsewhere"}.get(exc.errno, "choose a folder you can write to")
    return f"cannot write{where}: {reason}; {advice}"


def _nearest_existing(path: Path) -> Path | None:
    return next((p for p in [path, *path.parents] if p.exists()), None)


def _check_writable_place(path: Path, start: Path, flag: str, what: str) -> None:
    """The nearest existing one of `start` and its parents is a folder that can be written (probed: `os.access`
    says yes to root on a read-only or virtual filesystem); `path` is what the message names."""
    existing = _nearest_existing(start)
    if existing is None:
        return
    if not existing.is_dir():
        raise MedsegError(f"{flag} {path}: {existing} is a file, not a folder; give {what} in a folder")
    problem = None
    if not os.access(existing, os.W_OK | os.X_OK):
        problem = "permission denied"
    else:
        probe = _temporary(existing / ".medseg-write-test", "tmp")
        try:
            probe.touch(exist_ok=False)
        except OSError as exc:
            problem = exc.strerror or type(exc).__name__
        else:
            probe.unlink(missing_ok=True)
    if problem:
        raise MedsegError(f"{flag} {path}: {existing} is not writable ({problem}); give {what} you can write to")


def check_output_folder(path: str | Path, flag: str = "--out", advice: str = "give a folder (it is created when "
                        "missing)") -> Path:
    """Refuse, before any work, an output folder that cannot be: an existing file, below a file, or in a place
    that cannot be written. It may exist (its files are replaced) or not (it is created). `flag` names it in the
    message (e.g. "--out"); `advice` is what to do when it is a file or a broken link."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise MedsegError(f"{flag} {path} is a broken link (to {os.readlink(path)}); {advice}")
    if path.exists() and not path.is_dir():
        raise MedsegError(f"{flag} {path} is a file, not a folder; {advice}")
    _check_writable_place(path, path, flag, "a folder")  # the folder, or its nearest existing parent, is written
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """Refuse, before any work, an output file that cannot be written: an existing folder, a path below a file, a
    read-only place."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise MedsegError(f"{flag} {path} is a broken link (to {os.readlink(path)}); fix the link or give a file")
    if path.is_dir():
        raise MedsegError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'results.json'}")
    _check_writable_place(path, path.parent, flag, "a file")
    return path


@contextmanager
def user_write_errors() -> Iterator[None]:
    """Turn a write that fails for a reason outside medseg (full disk, quota, permissions, read-only mount) into a
    one-line user error naming the output; atomic writers have already removed their temporaries."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in USER_WRITE_ERRNOS:
            raise
        raise MedsegError(write_error_message(exc)) from None
