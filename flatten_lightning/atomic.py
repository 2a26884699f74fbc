"""Atomic writes of directories and files: build a temporary sibling, rename into place when complete.

A failure (or a kill) leaves either what was there before or the complete new directory, never
half of one. Temporaries are named ``.<name>.tmp-<host>.<pid>-<random>`` (``.old-`` for a replaced
directory on its way out), so the next write of the same output can tell a temporary left by a killed
process (same host, process gone) from one that a live process is still building, and removes only
the former. What is written gets the user's umask, like any file they create (mkdtemp makes 0700).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

_KINDS = ("tmp", "old")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _prefix(final: Path, kind: str) -> str:
    """The name prefix of this process's temporaries of ``final``: ``.<name>.<kind>-<host>.<pid>-``."""
    return f".{final.name}.{kind}-{_host()}.{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``final`` that a killed writer of ours left next to it; returns them.

    Only entries named ``.<final name>.tmp-<host>.<pid>-*`` or ``.old-`` with this host's name and a
    pid that no longer runs are removed; one from another host is left alone (its process may still be
    writing over a shared file system) and named in a log line.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(?:{'|'.join(_KINDS)})-(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)-[^/]+$")
    removed = []
    for entry in final.parent.iterdir():
        m = pattern.match(entry.name)
        if m is None:
            continue
        if m["host"] != _host():
            log.warning("left %s in place: it was written on host %s; remove it yourself if that job is gone", entry, m["host"])
            continue
        if int(m["pid"]) == os.getpid() or _pid_alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
        log.warning("removed %s, left behind by a killed write of %s (process %s)", entry, final, m["pid"])
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(final: str | os.PathLike, replace: bool) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final``; on success move it onto ``final``.

    If ``final`` exists by then: ``replace=True`` swaps it out (the old one is deleted after the
    rename), ``replace=False`` keeps it (another process won a race to build the same cache entry).
    On any exception the temporary directory is removed and the exception propagates. Stale
    temporaries of ``final`` from killed runs are removed first (see ``clean_stale_temporaries``).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(final, "tmp"), dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # as os.mkdir would have made it
        if not final.exists():
            os.replace(tmp, final)
        elif replace:
            old = Path(tempfile.mkdtemp(prefix=_prefix(final, "old"), dir=final.parent))
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
    clean_stale_temporaries(final)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(final, "tmp"), dir=final.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would have made it
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return final
