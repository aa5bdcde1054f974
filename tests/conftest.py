"""Shared fixtures: the real datasets beside the repository (../shared/data), a tiny phantom set and one
tiny trained run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one torch thread each (and in the commands they start), set
    # before any test module imports torch, so the workers do not fight over the cores.
    os.environ["OMP_NUM_THREADS"] = "1"

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MEDSEG = [sys.executable, "-m", "medseg"]
# Tiny settings that keep a training test to seconds on 2 CPU cores.
TINY = ("model.base_channels=4", "data.size=64", "train.batch_size=4", "data.num_workers=0", "train.epochs=2")


@pytest.fixture(scope="session", autouse=True)
def decoded_cache_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' decoded-data cache: a temporary folder (also for the commands they start), never ~/.cache."""
    folder = tmp_path_factory.mktemp("decoded-cache")
    previous = os.environ.get("MEDSEG_CACHE")
    os.environ["MEDSEG_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("MEDSEG_CACHE", None)
    else:
        os.environ["MEDSEG_CACHE"] = previous


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (see its README); a missing folder fails loudly instead of skipping tests."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data not found at {SHARED_DATA}; check out ../shared/data beside the repository")
    return SHARED_DATA


@pytest.fixture(scope="session")
def kvasir(shared_data: Path) -> Path:
    """The Kvasir-SEG polyp dataset in medseg's folder format (JPEG images, 0/255 PNG masks)."""
    folder = shared_data / "kvasir_seg"
    if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
        pytest.fail(f"{folder} lacks images/ or masks/; see {shared_data / 'README.md'}")
    return folder


@pytest.fixture(scope="session")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medseg.data.phantom import make_phantom

    return make_phantom(tmp_path_factory.mktemp("phantom") / "data", n=24, size=64, seed=3)


@pytest.fixture(scope="session")
def tiny_run(phantom: Path, tmp_path_factory: pytest.TempPathFactory):
    """One U-Net run trained for 2 epochs on the phantom, shared by evaluate / predict tests."""
    from medseg.config import load_recipe
    from medseg.engine.train import train

    return train(load_recipe("unet", TINY), phantom, out=tmp_path_factory.mktemp("runs"), progress=False)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m medseg ARGS` in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*MEDSEG, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


@pytest.fixture(scope="session")
def kvasir_subset(kvasir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 16 Kvasir-SEG pairs copied to a temporary folder (real images, odd sizes)."""
    root = tmp_path_factory.mktemp("kvasir16") / "kvasir16"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for stem in sorted(p.stem for p in (kvasir / "images").glob("*.jpg"))[:16]:
        shutil.copy(kvasir / "images" / f"{stem}.jpg", root / "images")
        shutil.copy(kvasir / "masks" / f"{stem}.png", root / "masks")
    return root


class CliResult:
    """What a `medseg` command did: exit status, stdout, stderr."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    def error_line(self) -> str:
        """The single `error: ...` line of a refused command (asserting there is exactly one, and no traceback)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        assert "Traceback" not in self.stderr and "Traceback" not in self.stdout, self.stderr
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1, self.stderr
        return errors[0]


def refused(result: CliResult, *fragments: str) -> str:
    """The error line of a command refused as a user error (exit 2), holding every fragment."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    line = result.error_line()
    for fragment in fragments:
        assert fragment in line, line
    return line


def medseg_inprocess(*args: str) -> CliResult:
    """Run `medseg ARGS` inside this process (what `main()` does: one line and exit 2 for a user error), for the
    many fast cases of the reliability catalogue. An unexpected exception is returned as exit 1 with its
    traceback on stderr, so a test asserting one clean line fails on it."""
    import contextlib
    import io
    import traceback

    from medseg import cli

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["medseg", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # noqa: BLE001 - a traceback is what the catalogue must catch
                traceback.print_exc(file=err)
                code = 1
    finally:
        sys.argv = argv
    return CliResult(code, out.getvalue(), err.getvalue())


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), to assert that inputs are untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[Path]:
    """Hidden temporary files or folders medseg's atomic writers would leave after a crash (.NAME.<id>.tmp)."""
    return [p for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old"))] if folder.exists() else []
