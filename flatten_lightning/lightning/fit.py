"""Compression and recovery with Lightning: ``flatten-train fit --config configs/smollm2_demo.yaml``.

A LightningCLI over ``FlattenModule`` (model source, optimizer, distillation) and ``FlattenDataModule``
(calibration / recovery / validation text); the callbacks (compression schedule, LoRA, export) and
the Trainer come from the YAML. Resume a killed run with ``--ckpt_path <dir>/last.ckpt``: the
compression plans and adapters in the checkpoint are rebuilt before its weights load.
Under FSDP, compress before wrapping (a first fit on one device or DDP that exports) or between fits.

Failure behaviour (what ``console_main`` adds to LightningCLI): SIGTERM saves ``preempted.ckpt`` and
exits 143 (``preemption.py``); bad input (config values, a missing, truncated or foreign checkpoint,
a resume whose model source differs from the checkpoint's) is one ``error:`` line and exit 2; a
diverged run is one ``error:`` line and exit 1, with nothing exported.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from flatten_lightning.export import NonFiniteModelError
from flatten_lightning.lightning.datamodule import FlattenDataModule
from flatten_lightning.lightning.module import CKPT_KEY, DivergenceError, FlattenModule, same_source
from flatten_lightning.lightning.preemption import PreemptionCheckpoint

SIGTERM_EXIT = 128 + 15  # the shell's status for a process ended by SIGTERM
# ckpt_path values Lightning resolves itself (not files).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


class CheckpointError(ValueError):
    """A --ckpt_path that cannot be resumed from: missing, unreadable, foreign, or made with another model source."""


def summarise_parse_error(message: str) -> str | None:
    """The line that matters in jsonargparse's nested message about a class's init argument, or None.

    For a bad callback argument jsonargparse prints ~80 lines (usage, every Union branch it tried);
    the cause is the innermost "Problem with given class_path" block.
    """
    at = message.rfind("Problem with given class_path '")
    if at < 0:
        return None
    m = re.match(r"Problem with given class_path '([^']+)':\n(.*)", message[at:], re.S)
    if m is None:
        return None
    cls, body = m.groups()
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    if not lines:
        return None
    key = re.match(r'Parser key "([^"]+)":', lines[0])
    if key is None:
        return f"{cls}: {lines[0]}. Fix: correct the callback's init_args in the config (see `fit --help`)."
    expected = re.findall(r"Expected a <class '([^']+)'>", body.split("Given value:")[0])
    given = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), "?")
    problem = f"expected {' or '.join(expected)}" if expected else (lines[1] if len(lines) > 1 else "invalid")
    return f"{cls}: init argument {key.group(1)}={given!r}: {problem}. Fix: correct it in the config's init_args."


class ArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, but a bad class init argument is reported in one line first."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        summary = summarise_parse_error(message)
        if summary is None or not self.exit_on_error:
            super().error(message, ex)
        sys.stderr.write(f"error: {summary}\ndetails: {message}\n")
        sys.exit(2)


def check_checkpoint(ckpt_path: str, source: str | None) -> dict:
    """Read ``ckpt_path`` (memory-mapped, tensors not loaded) and refuse what cannot resume this run.

    Returns the checkpoint's model hyperparameters. A truncated file, one not written by
    ``FlattenModule``, or one made from another model source than ``source`` is a ``CheckpointError``
    naming the file (and both sources).
    """
    if not os.path.isfile(ckpt_path):
        raise CheckpointError(
            f"--ckpt_path {ckpt_path} does not exist. Fix: pass an existing checkpoint, e.g. <run>/checkpoints/last.ckpt."
        )
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError ... for damaged files
        raise CheckpointError(
            f"--ckpt_path {ckpt_path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}): "
            "it is truncated or not a checkpoint. Fix: resume from an intact one (e.g. the previous step's)."
        ) from None
    if not isinstance(ckpt, dict) or CKPT_KEY not in ckpt:
        raise CheckpointError(f"--ckpt_path {ckpt_path} was not written by a flatten-train run. Fix: pass a checkpoint of this pipeline.")
    saved = ckpt[CKPT_KEY].get("source")
    if source is not None and saved is not None and not same_source(saved, source):
        raise CheckpointError(
            f"--ckpt_path {ckpt_path} was made from model.source {saved!r} but the config says {source!r}. "
            "Fix: resume with the checkpoint's source, or start a new run without --ckpt_path."
        )
    return dict(ckpt.get("hyper_parameters") or {})


class FlattenCLI(LightningCLI):
    """LightningCLI with the checks above: checkpoint read and compared first, preemption handled."""

    def _parse_ckpt_path(self) -> None:
        # Lightning replaces the config's model arguments with the checkpoint's here, silently: check first.
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and ckpt_path not in SPECIAL_CKPT_PATHS:
            check_checkpoint(ckpt_path, self.config[sub].get("model.source"))
        super()._parse_ckpt_path()

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        configured = list(config.get("callbacks") or [])
        if not any(isinstance(cb, PreemptionCheckpoint) for cb in configured + callbacks):
            callbacks = [*callbacks, PreemptionCheckpoint()]
        return super()._instantiate_trainer(config, callbacks)


def main(
    args: list[str] | None = None,
    run: bool = True,
    model_class: type[FlattenModule] = FlattenModule,
    datamodule_class: type[LightningDataModule] = FlattenDataModule,
) -> LightningCLI:
    """Parse ``args`` (default: sys.argv) and run the subcommand; ``run=False`` only builds the objects.

    ``model_class`` / ``datamodule_class``: a vision backbone's (``fit_images``) instead of the language model's.
    """
    return FlattenCLI(
        model_class,
        datamodule_class,
        seed_everything_default=0,
        auto_configure_optimizers=False,  # FlattenModule's AdamW covers trainable parameters only, rebuilt after each stage
        save_config_kwargs={"overwrite": True},  # a resumed run rewrites the same config.yaml
        parser_class=ArgumentParser,
        args=args,
        run=run,
    )


def console_main(args: list[str] | None = None, entry: Callable[[list[str] | None], object] = main) -> None:
    """``flatten-train`` and ``train.py``: exit statuses a shell script can act on.

    143 after SIGTERM (checkpoint saved, nothing exported), 2 with one ``error:`` line for bad input,
    1 with one ``error:`` line for a diverged model; other failures keep their traceback.
    """
    try:
        entry(args)
    except SIGTERMException:
        sys.exit(SIGTERM_EXIT)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (DivergenceError, NonFiniteModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def training_only_trainer(max_steps: int, callbacks: list[Callback], accelerator: str = "cpu", precision: str = "32-true") -> Trainer:
    """A Trainer that only trains, on one device, for ``max_steps``: no validation loop, checkpoints, logger,
    progress bar or model summary (what a script that measures on its own needs, e.g. a benchmark's callback)."""
    return Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=max_steps,
        precision=precision,
        callbacks=callbacks,
        logger=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
