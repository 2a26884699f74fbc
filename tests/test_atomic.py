"""Atomic writes: a failure leaves the old directory or file as it was and no temporary behind."""

import pytest

from flatten_lightning.atomic import atomic_dir, write_text_atomic


def test_atomic_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(final, replace=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in final.iterdir()] == ["old.txt"]
    with atomic_dir(final, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in final.iterdir()] == ["new.txt"]


def test_atomic_dir_keeps_an_existing_entry_when_not_replacing(tmp_path):
    final = tmp_path / "cache"
    final.mkdir()
    (final / "first.txt").write_text("first")
    with atomic_dir(final, replace=False) as tmp:
        (tmp / "second.txt").write_text("second")
    assert [p.name for p in final.iterdir()] == ["first.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_write_text_atomic(tmp_path):
    path = tmp_path / "sub" / "results.json"
    assert write_text_atomic(path, "{}") == path
    assert path.read_text() == "{}"
    with pytest.raises(TypeError):
        write_text_atomic(path, 123)  # fails inside the write: the old content must survive
    assert path.read_text() == "{}"
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]
