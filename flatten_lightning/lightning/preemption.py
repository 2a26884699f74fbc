"""PreemptionCheckpoint: on SIGTERM (the usual preemption signal) save a resumable checkpoint and say how to resume.

Lightning 2.6 turns SIGTERM into a flag; the loops raise ``SIGTERMException`` (a ``SystemExit`` with
no code, i.e. exit status 0) at the end of the current batch, after which ``on_exception`` runs on
every callback. Here the whole state is saved to ``preempted.ckpt`` next to ModelCheckpoint's files
(or under ``default_root_dir/checkpoints``) and the resume command is printed; ``flatten-train``
then exits with status 143 (128 + SIGTERM), so ``train.py && evaluate`` stops instead of evaluating an
older model. Nothing is exported. ``fit.py`` adds this callback to every run.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

PREEMPTED_NAME = "preempted.ckpt"


def checkpoint_dir(trainer: Trainer) -> str:
    """ModelCheckpoint's directory when there is one, else ``<default_root_dir>/checkpoints``."""
    cb = trainer.checkpoint_callback
    dirpath = getattr(cb, "dirpath", None) if cb is not None else None
    return str(dirpath or os.path.join(trainer.default_root_dir, "checkpoints"))


class PreemptionCheckpoint(Callback):
    """Save ``preempted.ckpt`` when the run is stopped by SIGTERM, and print how to resume it."""

    def __init__(self) -> None:
        self.saved: str | None = None  # the checkpoint written on SIGTERM (for callers and tests)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = os.path.join(checkpoint_dir(trainer), PREEMPTED_NAME)
        trainer.save_checkpoint(path)  # collective under DDP: every rank takes part, rank 0 writes
        self.saved = path
        if trainer.is_global_zero:
            print(
                f"preempted: SIGTERM at step {trainer.global_step}; saved {path}, nothing exported. "
                f"Resume with the same command plus --ckpt_path {path}",
                file=sys.stderr,
                flush=True,
            )
