"""Atomic writes: a failure leaves the old directory or file as it was and no temporary behind."""

import logging
import os
import signal
import stat
import subprocess
import sys

import pytest
from conftest import ROOT

from flatten_lightning.atomic import atomic_dir, clean_stale_temporaries, write_text_atomic


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


KILLED_WRITER = r"""
import os, signal, sys
sys.path.insert(0, "flatten_lightning")  # the module alone: importing the package would load torch (seconds)
from atomic import atomic_dir
with atomic_dir(sys.argv[1], replace=True) as tmp:
    (tmp / "half.bin").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_stale_temporary_of_a_killed_write_is_removed_next_time(tmp_path, caplog):
    final = tmp_path / "out"
    (tmp_path / ".unrelated.tmp-x").mkdir()  # not ours for this output: never touched
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(final)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1
    with caplog.at_level(logging.WARNING, logger="flatten_lightning.atomic"):
        with atomic_dir(final, replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".unrelated.tmp-x", "out"]
    assert f"removed {stale[0]}" in caplog.text and "killed write" in caplog.text


def test_temporaries_of_live_writers_and_other_hosts_are_kept(tmp_path):
    final = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = clean_stale_temporaries.__globals__["_host"]()
        live = tmp_path / f".out.tmp-{host}.{sleeper.pid}-abc"
        other = tmp_path / ".out.tmp-otherhost.1-abc"
        live.mkdir()
        other.mkdir()
        assert clean_stale_temporaries(final) == []
        assert live.is_dir() and other.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert clean_stale_temporaries(final) == [live]  # its writer is gone now


def test_written_directories_and_files_get_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d", replace=False) as tmp:
            (tmp / "a").write_text("a")
        write_text_atomic(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644
