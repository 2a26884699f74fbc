"""Checks of command-line values, shared by the commands.

``at_least`` is an argparse type (argparse reports ``error: argument --flag: ...``, exit 2); the
others raise ``ValueError`` with one line naming the flag, the value and the fix, which the commands
print as ``error: ...`` with exit status 2, before the model is loaded where the check allows it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from transformers import PreTrainedModel


def at_least(least: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``least`` (argparse then prints ``error: argument --flag: ...``, exit 2)."""

    def parse(value: str) -> int:
        try:
            x = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if x < least:
            raise argparse.ArgumentTypeError(f"{x} is too small. Fix: pass {least} or more")
        return x

    parse.__name__ = f"integer >= {least}"
    return parse


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
