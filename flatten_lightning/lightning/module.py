"""FlattenModule: a Hugging Face causal LM as a LightningModule for compression and recovery.

The module owns the *structure* of the model: the compression plans applied so far and the LoRA
adapters, if any. Both are written into every checkpoint (``on_save_checkpoint``) and replayed on a
freshly loaded dense model in ``on_load_checkpoint``, which Lightning 2.6 calls before it loads the
state dict (``_CheckpointConnector.restore_model``), and on every rank under DDP. So a checkpoint
taken after any compression stage, with or without adapters, resumes into the right shapes.

Losses, for a batch of token windows ``ids`` [B, T]:
  CE     = mean over the B(T-1) predicted tokens of -log p(ids[:, t+1] | ids[:, :t+1])
  KD     = T^2 * KL(softmax(teacher / T) || softmax(student / T)), same tokens (teacher = dense model)
  loss   = (1 - alpha) CE + alpha KD           (alpha = distill_alpha; 0 = plain next-token loss)
Validation: torchmetrics Perplexity on shifted logits/labels, summed over ranks.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.text import Perplexity
from transformers import PreTrainedModel

from flatten_lightning.compress import Plan, rebuild_structure
from flatten_lightning.export import count_parameters, save_compressed
from flatten_lightning.lora import LoraSpec, add_lora, is_peft, merge_lora
from flatten_lightning.perplexity import perplexity
from flatten_lightning.sources import DTYPES, EMBEDDED_DEFAULT, load_model

log = logging.getLogger(__name__)

CKPT_KEY = "flatten_lightning"


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the random draws (dropout masks) of optimizer step ``step`` on ``rank``.

    A function of (seed, step, rank) only, so a resumed run draws the same masks as an uninterrupted
    one, and a plain PyTorch loop can reproduce a Lightning run step for step.
    """
    return (seed * 1_000_003 + step) * 1024 + rank


class PlanMismatchError(ValueError):
    """A checkpoint's compression plan (or weights) does not fit the model it is loaded into."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or non-finite weights: the run stops before anything is saved or exported."""


def last_checkpoint_note(trainer: Any) -> str:
    """Where the last good checkpoint is, for error messages (ModelCheckpoint's last or best path)."""
    cb = getattr(trainer, "checkpoint_callback", None)
    path = (getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")) if cb is not None else ""
    return f"the last checkpoint, {path}, holds the weights before it" if path else "no checkpoint was saved before it"


class FlattenModule(LightningModule):
    """Wraps a causal LM for FlattenGPT compression (callbacks) and recovery training.

    Args:
        source: hub id, local Hugging Face directory, ``.gguf`` file, or ``smollm2`` (embedded default).
        dtype: weight dtype at load (``float32``, ``bfloat16``, ``float16``; ``float64`` for exactness checks).
        lr: AdamW learning rate (paper: 1e-4 with LoRA).
        weight_decay: AdamW weight decay.
        distill_alpha: weight of logit distillation from the dense model (0 disables it; no teacher is kept).
        distill_temperature: softmax temperature T of the distillation.
        seed: base of the per-step random seed (dropout masks depend on (seed, step, rank) only,
            so a resumed run draws the same masks as an uninterrupted one).
    """

    def __init__(
        self,
        source: str = EMBEDDED_DEFAULT,
        dtype: str = "float32",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        distill_alpha: float = 0.0,
        distill_temperature: float = 2.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
        if not 0.0 <= distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1], got {distill_alpha}")
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {distill_temperature}")
        self.save_hyperparameters()
        model, tokenizer = load_model(source, DTYPES[dtype])
        self.tokenizer = tokenizer
        self._hold(model, teacher=distill_alpha > 0)
        self.val_ppl = Perplexity()

    def _hold(self, model: nn.Module, teacher: bool) -> None:
        """Take the freshly loaded dense ``model`` (and a frozen copy as teacher): the state every subclass shares."""
        self.model: nn.Module = model
        self.original_layers: int = model.config.num_hidden_layers
        self.dense_params: int = count_parameters(model)
        # Structure applied so far, in order: what a checkpoint needs to rebuild the shapes.
        self.plans: list[Plan] = []
        self.lora_spec: LoraSpec | None = None
        # The teacher is the dense model, frozen. Kept out of the module tree on purpose: it must not
        # enter the state dict (checkpoints stay the student's size), the optimizer, or the DDP wrapper.
        self.__dict__["_teacher"] = self._make_teacher(model) if teacher else None

    @staticmethod
    def _make_teacher(model: nn.Module) -> nn.Module:
        teacher = copy.deepcopy(model).eval()
        teacher.requires_grad_(False)
        return teacher

    # ----------------------------------------------------------------------------------- structure
    @property
    def base_model(self) -> PreTrainedModel:
        """The Hugging Face model under any LoRA wrapper (what compression and export work on)."""
        return self.model.get_base_model() if is_peft(self.model) else self.model

    @property
    def num_layers(self) -> int:
        return self.base_model.config.num_hidden_layers

    def record_plan(self, plan: Plan) -> None:
        """Remember a compression stage that was just applied to ``self.model``; everything stays trainable."""
        self.plans.append(plan)
        self._all_trainable()

    def _all_trainable(self) -> None:
        # Flattened and pruned projections are built under no_grad, so they come out with
        # requires_grad=False; recovery between stages trains every weight (LoRA freezes them later).
        self.model.requires_grad_(True)

    def attach_lora(self, spec: LoraSpec) -> None:
        """Add LoRA adapters; only adapter weights stay trainable."""
        self.model = add_lora(self.model, spec)
        self.lora_spec = spec

    def merge_lora(self) -> None:
        """Fold adapters into the weights so the model is a plain HF model again (idempotent)."""
        self.model = merge_lora(self.model)
        self.lora_spec = None

    def structure_state(self) -> dict:
        return {
            "plans": [p.to_dict() for p in self.plans],
            "lora": self.lora_spec.to_dict() if self.lora_spec else None,
            "original_layers": self.original_layers,
            "source": self.hparams.source,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_KEY] = self.structure_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the checkpoint's structure (plans, then adapters) before Lightning loads its weights."""
        state = checkpoint.get(CKPT_KEY)
        if state is None:
            raise PlanMismatchError("the checkpoint has no flatten_lightning structure record: it was not written by FlattenModule")
        if self.plans or self.lora_spec is not None or is_peft(self.model):
            raise PlanMismatchError("on_load_checkpoint needs the freshly loaded dense model, but this module is already compressed")
        for i, d in enumerate(state["plans"]):
            plan = Plan.from_dict(d)
            try:
                rebuild_structure(self.model, plan)
            except ValueError as e:
                raise PlanMismatchError(
                    f"compression stage {i + 1} of the checkpoint does not fit this model ({self.hparams.source}): {e}"
                ) from e
            self.plans.append(plan)
        self._all_trainable()  # as after the live stages, so the optimizer holds the same parameters
        if state["lora"] is not None:
            self.attach_lora(LoraSpec.from_dict(state["lora"]))
        self._check_weights_fit(checkpoint["state_dict"])

    def _check_weights_fit(self, saved: dict[str, torch.Tensor]) -> None:
        """Compare names and shapes before loading, so a mismatch names the plan, not a torch stack trace."""
        mine = self.state_dict()
        missing = sorted(set(mine) - set(saved))
        extra = sorted(set(saved) - set(mine))
        shapes = [k for k in mine.keys() & saved.keys() if tuple(mine[k].shape) != tuple(saved[k].shape)]
        if missing or extra or shapes:
            details = []
            if shapes:
                k = sorted(shapes)[0]
                details.append(
                    f"{len(shapes)} tensors differ in shape, e.g. {k}: checkpoint {tuple(saved[k].shape)} vs rebuilt {tuple(mine[k].shape)}"
                )
            if missing:
                details.append(f"{len(missing)} tensors missing from the checkpoint, e.g. {missing[0]}")
            if extra:
                details.append(f"{len(extra)} unexpected tensors in the checkpoint, e.g. {extra[0]}")
            raise PlanMismatchError(
                "the checkpoint's compression plan does not match its weights on this model: "
                + "; ".join(details)
                + ". Fix: resume with the same model source and an unmodified checkpoint."
            )

    # ------------------------------------------------------------------------------------ training
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] for ids [B, T]."""
        return self.model(input_ids=input_ids, use_cache=False).logits

    def on_fit_start(self) -> None:
        # Loaded models come in eval mode; Lightning 2.6 leaves modes alone, and LoRA dropout needs train mode.
        self.model.train()

    def seeded(self, batch: torch.Tensor) -> torch.Tensor:
        """``self(batch)`` in train mode with this step's dropout seed (``step_seed``), the global RNG untouched."""
        self.model.train()  # Lightning 2.6 does not switch modes for training; adapters' dropout needs it
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(step_seed(self.hparams.seed, self.global_step, self.global_rank))
            return self(batch)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        logits = self.seeded(batch)[:, :-1]
        target = batch[:, 1:]
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))
        loss = ce
        alpha = self.hparams.distill_alpha
        if alpha > 0:
            kd = self._distillation(batch, logits)
            loss = (1 - alpha) * ce + alpha * kd
            self.log("train_kd", kd, prog_bar=False, sync_dist=False)
        if not bool(torch.isfinite(loss)):
            self._diverged(f"the training loss is {loss.item()}")
        self.log("train_loss", ce, prog_bar=True)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimizer step, then a check that it left every trained weight finite.

        Here, before ``on_train_batch_end``, so that ModelCheckpoint never saves a NaN state as ``last.ckpt``.
        """
        optimizer.step(closure=optimizer_closure)
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if params and not bool(torch.stack([torch.isfinite(p).all() for _, p in params]).all()):
            bad = next(n for n, p in params if not bool(torch.isfinite(p).all()))
            self._diverged(f"the optimizer step made {bad} non-finite")

    def _diverged(self, what: str) -> None:
        raise DivergenceError(
            f"training diverged at step {self.global_step}: {what} (model.lr {self.hparams.lr}). Nothing was exported; "
            f"{last_checkpoint_note(self._trainer)}. Fix: lower model.lr, then resume from that checkpoint with --ckpt_path or restart."
        )

    def teacher(self) -> nn.Module:
        """The frozen dense model, on this module's device."""
        teacher = self.__dict__["_teacher"]
        if next(teacher.parameters()).device != self.device:
            teacher.to(self.device)
        return teacher

    def _distillation(self, batch: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """T^2 KL(teacher || student) per predicted token, teacher run without gradients."""
        teacher = self.teacher()
        t = self.hparams.distill_temperature
        with torch.no_grad():
            t_logits = teacher(input_ids=batch, use_cache=False).logits[:, :-1]
        v = logits.shape[-1]
        s = F.log_softmax(logits.float().reshape(-1, v) / t, dim=-1)
        p = F.log_softmax(t_logits.float().reshape(-1, v) / t, dim=-1)
        return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        logits = self(batch)
        self.val_ppl.update(logits[:, :-1].float(), batch[:, 1:])
        self.log("val_ppl", self.val_ppl, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters only (after LoRA: the adapters)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: every weight is frozen")
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    @torch.no_grad()
    def heldout_perplexity(
        self, ids: torch.Tensor, seqlen: int, max_windows: int | None, batch_size: int = 1, progress: bool = False
    ) -> float:
        """Perplexity (library protocol) on the 1-D held-out ids, in eval mode; the mode is restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            return perplexity(self.model, ids, seqlen, max_windows, batch_size, progress=progress).ppl
        finally:
            self.model.train(was_training)

    def save_export(self, out_dir: str, report: dict, overwrite: bool = False) -> Path:
        """Write the (merged) model, its tokenizer and ``report`` as a plain Hugging Face directory (ExportCallback)."""
        return save_compressed(self.base_model, self.tokenizer, out_dir, report, overwrite=overwrite)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
