"""What Lightning runs: FlattenModule, FlattenDataModule and the ``flatten-train`` command (``fit.py``,
with the SIGTERM checkpoint of ``preemption.py`` that it adds to every run); for vision backbones
ImageFlattenModule, ImageDataModule and ``flatten-train-images`` (``fit_images.py``), the same command
with label-free recovery by feature distillation.

This subpackage is the only place under ``flatten_lightning/`` that imports Lightning; the rest of the
library is maths on tensors and Hugging Face modules. The callbacks that hook into a run live in the
top-level ``callbacks/`` package.
"""

from flatten_lightning.lightning.datamodule import FlattenDataModule
from flatten_lightning.lightning.module import FlattenModule, PlanMismatchError

__all__ = ["FlattenDataModule", "FlattenModule", "PlanMismatchError"]
