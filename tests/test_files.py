"""The one atomic file writer and the one atomic folder writer: whole outputs or none, never a temporary left."""

import os

import numpy as np
import pytest

from medseg import files
from medseg.files import atomic_file, atomic_folder, write_text_atomic


class Boom(RuntimeError):
    pass


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_file_renames_into_place_and_replaces(tmp_path):
    target = tmp_path / "new" / "matrix.npy"
    with atomic_file(target) as tmp, tmp.open("wb") as stream:
        assert tmp.parent == target.parent and tmp.name.startswith(".matrix.npy.") and not target.exists()
        np.save(stream, np.arange(3))
    assert np.array_equal(np.load(target), np.arange(3)) and names(target.parent) == ["matrix.npy"]
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"second")
    assert target.read_bytes() == b"second" and names(target.parent) == ["matrix.npy"]


def test_a_failure_inside_leaves_no_file_and_no_temporary(tmp_path):
    with pytest.raises(Boom):
        with atomic_file(tmp_path / "half.txt") as tmp:
            tmp.write_text("half of it")
            raise Boom
    assert names(tmp_path) == []
    (tmp_path / "kept.txt").write_text("old")
    with pytest.raises(Boom):
        with atomic_file(tmp_path / "kept.txt") as tmp:
            tmp.write_text("new")
            raise Boom
    assert names(tmp_path) == ["kept.txt"] and (tmp_path / "kept.txt").read_text() == "old"


def test_a_block_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_file(tmp_path / "empty.txt"):
            pass
    assert names(tmp_path) == []


def test_write_text_atomic(tmp_path):
    target = tmp_path / "a" / "b" / "config.yaml"
    write_text_atomic(target, "name: ü\n")
    write_text_atomic(target, "name: second\n")
    assert target.read_text(encoding="utf-8") == "name: second\n" and names(target.parent) == ["config.yaml"]


def test_atomic_folder_builds_aside_and_renames(tmp_path):
    with atomic_folder(tmp_path / "run") as tmp:
        (tmp / "model").mkdir()
        (tmp / "model" / "config.json").write_text("{}")
        assert names(tmp_path) == [tmp.name] and tmp.name.startswith(".run.")
    assert names(tmp_path) == ["run"] and (tmp_path / "run" / "model" / "config.json").read_text() == "{}"


def test_a_failure_inside_a_folder_leaves_nothing_and_keeps_the_old_folder(tmp_path):
    with pytest.raises(Boom):
        with atomic_folder(tmp_path / "fresh") as tmp:
            (tmp / "part.txt").write_text("half")
            raise Boom
    assert names(tmp_path) == []
    old = tmp_path / "eval"
    old.mkdir()
    (old / "summary.json").write_text("old")
    with pytest.raises(Boom):
        with atomic_folder(old, replace=True) as tmp:
            (tmp / "summary.json").write_text("new")
            raise Boom
    assert names(tmp_path) == ["eval"] and (old / "summary.json").read_text() == "old"


def test_replace_swaps_the_folder_and_refuses_without_it(tmp_path):
    old = tmp_path / "eval"
    old.mkdir()
    (old / "stale.txt").write_text("stale")
    with pytest.raises(OSError):
        with atomic_folder(old) as tmp:  # without replace an existing non-empty folder is not overwritten
            (tmp / "summary.json").write_text("new")
    assert names(tmp_path) == ["eval"] and names(old) == ["stale.txt"]
    with atomic_folder(old, replace=True) as tmp:
        (tmp / "summary.json").write_text("new")
    assert names(tmp_path) == ["eval"] and names(old) == ["summary.json"]


def test_replace_puts_the_old_folder_back_when_the_new_one_cannot_move_in(tmp_path, monkeypatch):
    old = tmp_path / "model"
    old.mkdir()
    (old / "weights").write_text("trained")
    real_replace, calls = os.replace, []

    def second_rename_fails(source, destination):
        calls.append(source)
        if len(calls) == 2:  # the old folder is aside; the new one fails to move in
            raise Boom
        real_replace(source, destination)

    monkeypatch.setattr(files.os, "replace", second_rename_fails)
    with pytest.raises(Boom):
        with atomic_folder(old, replace=True) as tmp:
            (tmp / "weights").write_text("new")
    assert names(tmp_path) == ["model"] and (old / "weights").read_text() == "trained"
