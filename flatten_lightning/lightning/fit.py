"""Compression and recovery with Lightning: ``flatten-train fit --config configs/smollm2_demo.yaml``.

A LightningCLI over ``FlattenModule`` (model source, optimizer, distillation) and ``FlattenDataModule``
(calibration / recovery / validation text); the callbacks (compression schedule, LoRA, export) and
the Trainer come from the YAML. Resume a killed run with ``--ckpt_path <dir>/last.ckpt``: the
compression plans and adapters in the checkpoint are rebuilt before its weights load.
Under FSDP, compress before wrapping (a first fit on one device or DDP that exports) or between fits.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from flatten_lightning.lightning.datamodule import FlattenDataModule
from flatten_lightning.lightning.module import FlattenModule


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Parse ``args`` (default: sys.argv) and run the subcommand; ``run=False`` only builds the objects."""
    return LightningCLI(
        FlattenModule,
        FlattenDataModule,
        seed_everything_default=0,
        auto_configure_optimizers=False,  # FlattenModule's AdamW covers trainable parameters only, rebuilt after each stage
        save_config_kwargs={"overwrite": True},  # a resumed run rewrites the same config.yaml
        args=args,
        run=run,
    )


def console_main() -> None:
    """The ``flatten-train`` console script (LightningCLI returns an object, not an exit status)."""
    main()
