"""moe_unlearn.atomic: success replaces the destination; an error leaves it (and its folder) as it was."""

import json

import pytest

from moe_unlearn import atomic


def test_atomic_path_replaces_on_success(tmp_path):
    dest = tmp_path / "a.json"
    dest.write_text("old")
    with atomic.atomic_path(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".json"
        tmp.write_text("new")
    assert dest.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    atomic.write_json(tmp_path / "sub" / "b.json", {"x": 1}, indent=None)
    assert json.loads((tmp_path / "sub" / "b.json").read_text()) == {"x": 1}


def test_atomic_path_error_keeps_old_content(tmp_path):
    dest = tmp_path / "a.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    with pytest.raises(TypeError):
        atomic.write_json(dest, {"x": object()})
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir(tmp_path):
    dest = tmp_path / "d"
    with atomic.atomic_dir(dest) as tmp:
        (tmp / "f").write_text("1")
    assert (dest / "f").read_text() == "1"
    with pytest.raises(RuntimeError), atomic.atomic_dir(dest, replace=True) as tmp:
        (tmp / "g").write_text("2")
        raise RuntimeError("boom")
    assert [p.name for p in dest.iterdir()] == ["f"]
    with pytest.raises(OSError), atomic.atomic_dir(dest) as tmp:  # non-empty and not replace: refused
        (tmp / "g").write_text("2")
    with atomic.atomic_dir(dest, replace=True) as tmp:
        (tmp / "g").write_text("2")
    assert [p.name for p in dest.iterdir()] == ["g"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


@pytest.mark.parametrize("exists", [False, True])
def test_staged_files_all_or_nothing(tmp_path, exists):
    out = tmp_path / "out"
    if exists:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        (out / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic.staged_files(out) as stage:
        (stage / "a.txt").write_text("new")
        raise RuntimeError("second writer failed")
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if exists else [])
    if exists:
        assert sorted(p.name for p in out.iterdir()) == ["a.txt", "keep.txt"]
        assert (out / "a.txt").read_text() == "old"
    with atomic.staged_files(out, last="b.txt") as stage:
        (stage / "a.txt").write_text("new")
        (stage / "b.txt").write_text("b")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"] + (["keep.txt"] if exists else [])
    assert (out / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
