"""The Lightning layer: FlattenModule, FlattenDataModule and strategy helpers.

This subpackage is the only place under ``flatten_lightning/`` that imports Lightning; the rest of the
library is maths on tensors and Hugging Face modules. ``callbacks/`` and ``train.py`` build on it.
"""

from flatten_lightning.lightning.data import FlattenDataModule
from flatten_lightning.lightning.module import FlattenModule, PlanMismatchError

__all__ = ["FlattenDataModule", "FlattenModule", "PlanMismatchError"]
