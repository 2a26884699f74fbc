"""Atomic writes of directories and files: build a temporary sibling, rename into place when complete.

A failure (or a kill) leaves either what was there before or the complete new directory, never
half of one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(final: str | os.PathLike, replace: bool) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final``; on success move it onto ``final``.

    If ``final`` exists by then: ``replace=True`` swaps it out (the old one is deleted after the
    rename), ``replace=False`` keeps it (another process won a race to build the same cache entry).
    On any exception the temporary directory is removed and the exception propagates.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if not final.exists():
            os.replace(tmp, final)
        elif replace:
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / "x")
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(final: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``final`` through a temporary sibling and a rename (creating parent folders).

    A reader sees the old file or the new one, never half of it; returns ``final`` as a Path.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return final
