"""Atomic directory writes: build in a temporary sibling, rename into place only when complete.

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
