"""Export: a plain Hugging Face model directory plus ``compression_report.json``, written atomically.

Everything goes to a temporary sibling directory first and is renamed into place at the end, so a
failure (or a kill) leaves either the old directory or the complete new one, never half of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flatten_lightning.atomic import atomic_dir

REPORT_NAME = "compression_report.json"


class OutputExistsError(FileExistsError):
    """The output directory exists and is not empty."""


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse a non-empty existing output directory unless ``overwrite`` (checked before any work)."""
    p = Path(out_dir)
    if p.exists() and (not p.is_dir() or any(p.iterdir())) and not overwrite:
        raise OutputExistsError(
            f"output directory {p} exists and is not empty. Fix: choose another --out, or pass --overwrite to replace it."
        )


def count_parameters(model: PreTrainedModel) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


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
    """
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    with atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for write in extras:
            write(tmp)
        with open(tmp / REPORT_NAME, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return out
