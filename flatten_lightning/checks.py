"""Checks of command-line values that argparse's types accept but a run cannot use.

Each raises ``ValueError`` with one line naming the flag, the value and the fix; the commands turn
it into ``error: ...`` and exit status 2, before the model is loaded where the check allows it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import PreTrainedModel


def check_at_least(values: Iterable[tuple[str, int | None, int]]) -> None:
    """For each ``(flag, value, least)``: a value given (not None) must be >= least."""
    for flag, value, least in values:
        if value is not None and value < least:
            raise ValueError(f"{flag} {value} is too small. Fix: pass {flag} {least} or more.")


def check_device(device: str) -> None:
    """Fail before loading when ``device`` does not exist here (e.g. ``cuda:3`` on a 2-GPU node)."""
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device name. Fix: pass cpu, cuda or cuda:N.") from None
    if d.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (d.index or 0) >= count:
            raise ValueError(
                f"--device {device} does not exist: this machine has {count} CUDA device(s). "
                + (f"Fix: pass cuda:0 .. cuda:{count - 1} or cpu." if count else "Fix: pass --device cpu.")
            )


def check_seqlen(model: PreTrainedModel, seqlen: int, flag: str) -> None:
    """Refuse windows longer than the model's positions (they would run silently, out of distribution)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise ValueError(f"{flag} {seqlen} is above the model's max_position_embeddings {limit}. Fix: pass {flag} {limit} or less.")
