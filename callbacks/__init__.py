"""Lightning callbacks that call the flatten_lightning library at the right moments of ``fit``.

- ``FlattenCallback`` (compression.py): FlattenGPT compression stages at scheduled steps.
- ``LoRACallback`` (lora.py): LoRA recovery adapters after the last stage, merged at the end.
- ``ExportCallback`` (export.py): a plain Hugging Face directory plus ``compression_report.json``.
"""

from callbacks.compression import FlattenCallback, ScheduleError, Stage
from callbacks.export import ExportCallback
from callbacks.lora import LoRACallback

__all__ = ["ExportCallback", "FlattenCallback", "LoRACallback", "ScheduleError", "Stage"]
