"""Lightning callbacks that call the flatten_lightning library at the right moments of ``fit``.

The Lightning glue lives in two places with one rule between them: ``flatten_lightning/lightning/``
holds what Lightning *runs* (the LightningModule, the DataModule and the ``flatten-train`` CLI), and
this package holds what *hooks into* a run:

- ``FlattenCallback`` (compression.py): FlattenGPT compression stages at scheduled steps.
- ``LoRACallback`` (lora_adapters.py): LoRA recovery adapters after the last stage, merged at the end.
- ``ExportCallback`` (model_export.py): a plain Hugging Face directory plus ``compression_report.json``.
- strategy.py: what a structure change mid-fit means for DDP and the optimizer (used by the callbacks only).
"""

from callbacks.compression import FlattenCallback, ScheduleError, Stage
from callbacks.lora_adapters import LoRACallback
from callbacks.model_export import ExportCallback

__all__ = ["ExportCallback", "FlattenCallback", "LoRACallback", "ScheduleError", "Stage"]
