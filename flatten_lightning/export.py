"""Export: a plain Hugging Face model directory plus ``compression_report.json``, written atomically.

Everything goes to a temporary sibling directory first and is renamed into place at the end, so a
failure (or a kill) leaves either the old directory or the complete new one, never half of one.
``check_output_dir`` runs before any work: it refuses an output that would destroy something that is
not ours (``--overwrite`` replaces only an empty directory or an earlier export, never one holding an
input of the run) and an output location that cannot be written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flatten_lightning.atomic import atomic_dir

REPORT_NAME = "compression_report.json"

log = logging.getLogger(__name__)


class OutputExistsError(FileExistsError):
    """The output directory exists and may not be replaced."""


class OutputLocationError(ValueError):
    """The output location cannot be created or written."""


class NonFiniteModelError(RuntimeError):
    """The model holds NaN or infinite weights: it must not be exported."""


def _inside(path: str | os.PathLike, directory: Path) -> bool:
    p, d = os.path.realpath(path), os.path.realpath(directory)
    return p == d or p.startswith(d.rstrip(os.sep) + os.sep)


def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


def check_writable(out_dir: str | os.PathLike, needed_bytes: int | None = None) -> None:
    """Fail when ``out_dir`` cannot be created and written; warn when free space is below ``needed_bytes``.

    Probes by creating (and removing) a file in the nearest existing ancestor, which also catches
    read-only mounts that permission bits do not show.
    """
    out = Path(out_dir)
    base = _existing_ancestor(out)
    if not base.is_dir():
        raise OutputLocationError(f"output {out} cannot be created: {base} is a file, not a directory. Fix: choose another --out.")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=base)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputLocationError(
            f"output {out} cannot be written: {base} is not writable ({e.strerror}). Fix: choose another --out."
        ) from None
    if needed_bytes:
        free = shutil.disk_usage(base).free
        if free < needed_bytes:
            log.warning(
                "only %.2f GB free at %s, the model takes about %.2f GB: the export may fail at the end. Free space or choose another --out.",
                free / 1e9,
                base,
                needed_bytes / 1e9,
            )


def check_output_dir(
    out_dir: str | os.PathLike, overwrite: bool, inputs: Sequence[str | os.PathLike] = (), needed_bytes: int | None = None
) -> None:
    """Refuse an output the run may not write, before any work.

    An existing non-empty directory needs ``overwrite``, and even then only an earlier export of ours
    (it holds ``compression_report.json``) is replaced; a directory containing one of ``inputs`` (the
    source model, the calibration file ...) or a file is never replaced.
    """
    p = Path(out_dir)
    for i in inputs:
        if i and os.path.exists(i) and _inside(i, p):
            where = "is" if os.path.realpath(i) == os.path.realpath(p) else f"contains {i},"
            raise OutputExistsError(f"output directory {p} {where} an input of this run. Fix: choose another --out.")
    if p.exists() and not p.is_dir():
        raise OutputExistsError(f"output {p} exists and is a file, not a directory. Fix: choose another --out.")
    if p.exists() and any(p.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                f"output directory {p} exists and is not empty. Fix: choose another --out, or pass --overwrite to replace it."
            )
        if not (p / REPORT_NAME).is_file():
            raise OutputExistsError(
                f"output directory {p} is not an earlier export (no {REPORT_NAME}), so --overwrite will not replace it. "
                "Fix: choose another --out, or empty that directory yourself."
            )
    check_writable(p, needed_bytes)


def count_parameters(model: PreTrainedModel) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def check_finite(model: torch.nn.Module) -> None:
    """Raise ``NonFiniteModelError`` naming the first tensors that hold NaN or inf (a diverged model)."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteModelError(
            f"the model has non-finite weights in {len(bad)} tensors (e.g. {', '.join(bad[:3])}); nothing was exported. "
            "Fix: lower the learning rate and resume from the last checkpoint, or restart."
        )


def save_compressed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | os.PathLike,
    report: dict,
    overwrite: bool = False,
    extras: Sequence[Callable[[Path], object]] = (),
) -> Path:
    """Write model (safetensors), tokenizer and report to ``out_dir`` atomically; returns the path.

    ``extras`` write more files into the same temporary directory (a vision model's saliency decoder).
    A model with NaN or infinite weights is refused (``NonFiniteModelError``) before anything is written.
    A write that fails (e.g. a full disk) leaves ``out_dir`` as it was and no temporary behind.
    """
    out = Path(out_dir)
    check_finite(model)
    check_output_dir(out, overwrite)
    try:
        with atomic_dir(out, replace=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for write in extras:
                write(tmp)
            with open(tmp / REPORT_NAME, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
    except OSError as e:
        raise OSError(
            e.errno,
            f"writing {out} failed ({e.strerror or e}); {out} was left as it was and the partial copy removed. "
            "Fix: free space (or choose another --out) and run again",
        ) from e
    return out
