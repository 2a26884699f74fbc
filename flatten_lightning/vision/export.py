"""Export a compressed vision backbone with its saliency decoder: one plain directory, written atomically.

``AutoModel.from_pretrained(out)`` loads the backbone with no code of ours; ``load_vision_model(out)``
loads the backbone and the decoder (``saliency_decoder.safetensors``), so the whole compressed
saliency model runs. ``compression_report.json`` sits beside them as for language models.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import PreTrainedModel

from flatten_lightning.export import save_compressed
from flatten_lightning.vision.decoder import SaliencyDecoder, save_decoder


def save_vision_compressed(
    backbone: PreTrainedModel, decoder: SaliencyDecoder | None, out_dir: str | os.PathLike, report: dict, overwrite: bool = False
) -> Path:
    """Write backbone (safetensors), decoder (if any) and report to ``out_dir`` in one atomic rename."""
    extras = () if decoder is None else (lambda tmp: save_decoder(decoder, tmp),)
    return save_compressed(backbone, None, out_dir, report, overwrite=overwrite, extras=extras)
