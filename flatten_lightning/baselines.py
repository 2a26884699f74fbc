"""Peer methods run in the same pipeline, for side-by-side numbers.

ShortGPT (Men et al., 2024): block influence BI_l = 1 - E[cos(input_l, output_l)] on calibration
data, measured once on the dense model; the blocks with the lowest BI are removed.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from flatten_lightning.arch import check_supported, decoder_layers
from flatten_lightning.calibrate import BlockRunner, Reduce, io_similarities, no_reduce
from flatten_lightning.compress import install_blocks, validate_target


@torch.no_grad()
def shortgpt(
    model: PreTrainedModel, calib_ids: torch.Tensor, target_layers: int,
    device: torch.device | str | None = None, batch_size: int = 4, reduce: Reduce = no_reduce,
) -> tuple[list[int], list[float]]:
    """Drop the blocks of lowest block influence in place; returns (removed indices, BI per block)."""
    check_supported(model)
    blocks = list(decoder_layers(model))
    validate_target(len(blocks), target_layers)
    runner = BlockRunner(model, device or next(model.parameters()).device, batch_size)
    influence = [1.0 - s for s in io_similarities(runner, runner.embed(calib_ids), blocks, reduce=reduce)]
    removed = sorted(sorted(range(len(blocks)), key=lambda i: influence[i])[: len(blocks) - target_layers])
    kept = [i for i in range(len(blocks)) if i not in removed]
    install_blocks(model, [blocks[i] for i in kept], [[i] for i in kept])
    return removed, influence
