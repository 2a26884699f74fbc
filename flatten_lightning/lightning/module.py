"""FlattenModule: a Hugging Face causal LM as a LightningModule for compression and recovery.

The module owns the *structure* of the model: the compression plans applied so far and the LoRA
adapters, if any. Both are written into every checkpoint (``on_save_checkpoint``) and replayed on a
freshly loaded dense model in ``on_load_checkpoint``, which Lightning 2.6 calls before it loads the
state dict (``_CheckpointConnector.restore_model``), and on every rank under DDP. So a checkpoint
taken after any compression stage, with or without adapters, resumes into the right shapes.

Losses, for a batch of token windows ``ids`` [B, T] (``flatten_lightning.distill``; teacher = the dense model):
  CE     = mean over the B(T-1) predicted tokens of -log p(ids[:, t+1] | ids[:, :t+1])
  KD     = tau^2 * KL(softmax(z_teacher / tau) || softmax(z_student / tau)), same tokens
  HD     = (1 / L') sum_i mean((h_i - t_{g(i)})^2) / mean(t_{g(i)}^2)                 (distill_hidden_norm: global)
         = (1 / L') sum_i mean_{B,T}(||h_i - t_{g(i)}||^2 / ||t_{g(i)}||^2)            (distill_hidden_norm: token)
             h_i: output of block i of the compressed model (L' blocks), before the final norm;
             t_{g(i)}: the dense model's output after g(i), the last original block that block i holds
             (the recorded plans' groups, composed over the stages); means over B, T, D unless marked
  loss   = (1 - alpha) CE + alpha KD + beta HD     (alpha = distill_alpha, beta = distill_hidden; 0, 0 = plain next-token loss)
Validation: torchmetrics Perplexity on shifted logits/labels, summed over ranks.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.text import Perplexity
from transformers import PreTrainedModel

from flatten_lightning.adapters import get_adapter
from flatten_lightning.compress import Plan, rebuild_structure
from flatten_lightning.distill import HIDDEN_NORMS, block_outputs, compose_groups, hidden_distillation, logit_distillation, teacher_blocks
from flatten_lightning.export import REPORT_NAME, count_parameters, save_compressed
from flatten_lightning.lora import LoraSpec, add_lora, is_peft, merge_lora
from flatten_lightning.perplexity import perplexity
from flatten_lightning.report import plans_of
from flatten_lightning.schedule import check_schedule, lr_factor
from flatten_lightning.sources import DTYPES, EMBEDDED_DEFAULT, load_model, source_path

log = logging.getLogger(__name__)

CKPT_KEY = "flatten_lightning"


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the random draws (dropout masks) of optimizer step ``step`` on ``rank``.

    A function of (seed, step, rank) only, so a resumed run draws the same masks as an uninterrupted
    one, and a plain PyTorch loop can reproduce a Lightning run step for step.
    """
    return (seed * 1_000_003 + step) * 1024 + rank


def same_source(a: str, b: str) -> bool:
    """Two spellings of one model source: a packaged name and its converted directory (``smollm2`` and the path
    the compression command records), a local directory by its real path, anything else as written."""
    a, b = source_path(a), source_path(b)
    if os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


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
        distill_alpha: weight alpha of logit distillation from the dense model, in [0, 1] (0 disables it).
        distill_temperature: softmax temperature tau of the logit distillation.
        distill_hidden: weight beta >= 0 of hidden-state distillation: each compressed block's output against
            the dense model's at the end of the original blocks it holds (0 disables it). With both
            weights 0 no teacher is kept.
        distill_hidden_norm: ``global`` (each block's squared error over the teacher state's mean square) or
            ``token`` (each token's relative squared error, averaged; robust to massive activations).
        lr_schedule: ``constant`` or ``cosine`` (to 0 at the fit's last optimizer step), after ``warmup_steps``
            of linear warmup (``flatten_lightning.schedule``; a function of the global step, so resumes agree).
        warmup_steps: optimizer steps of linear warmup W (0: none).
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
        distill_hidden: float = 0.0,
        distill_hidden_norm: str = "global",
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
        if not 0.0 <= distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1], got {distill_alpha}")
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {distill_temperature}")
        if not (math.isfinite(distill_hidden) and distill_hidden >= 0):
            raise ValueError(f"distill_hidden must be a finite number >= 0 (0 disables hidden-state distillation), got {distill_hidden}")
        if distill_hidden_norm not in HIDDEN_NORMS:
            raise ValueError(f"distill_hidden_norm '{distill_hidden_norm}' is not one of {', '.join(HIDDEN_NORMS)}")
        check_schedule(lr_schedule, warmup_steps)
        self.save_hyperparameters()
        model, tokenizer = load_model(source, DTYPES[dtype])
        self.tokenizer = tokenizer
        self._hold(model, teacher=distill_alpha > 0 or distill_hidden > 0)
        # Hidden-state distillation finds the blocks through the family's adapter: built now, so an unsupported
        # family fails before any work, and on the plain model (its checks refuse LoRA-wrapped projections).
        # The adapter reads the block list from the model each time, so it follows compression and LoRA.
        hidden = distill_hidden > 0
        self.__dict__["_adapters"] = (get_adapter(self.model), get_adapter(self.__dict__["_teacher"])) if hidden else None
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

    def use_teacher(self, model: PreTrainedModel) -> None:
        """Distil from a frozen copy of ``model`` instead of the dense source, e.g. the source after its own
        recovery on the same text. It must have the source's depth (hidden-state distillation indexes its blocks
        by the original ones). Not saved in checkpoints: a resumed run distils from the source again."""
        if self.__dict__["_teacher"] is None:
            raise ValueError("this module keeps no teacher (distill_alpha and distill_hidden are 0). Fix: set one of them > 0.")
        if model.config.num_hidden_layers != self.original_layers:
            raise ValueError(
                f"the teacher has {model.config.num_hidden_layers} blocks, the source {self.original_layers}. "
                "Fix: pass a model of the source's structure (the dense model, trained or not)."
            )
        teacher = self._make_teacher(model)
        self.__dict__["_teacher"] = teacher
        if self.__dict__["_adapters"] is not None:
            self.__dict__["_adapters"] = (self.__dict__["_adapters"][0], get_adapter(teacher))

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
        self._replay(state["plans"], "the checkpoint", "on_load_checkpoint")
        if state["lora"] is not None:
            self.attach_lora(LoraSpec.from_dict(state["lora"]))
        self._check_weights_fit(checkpoint["state_dict"])

    def _replay(self, plans: list[dict], what: str, caller: str) -> None:
        """Rebuild the structure of ``plans`` (plan dicts, in stage order) on the freshly loaded dense model."""
        if self.plans or self.lora_spec is not None or is_peft(self.model):
            raise PlanMismatchError(f"{caller} needs the freshly loaded dense model, but this module is already compressed")
        for i, d in enumerate(plans):
            plan = Plan.from_dict(d)
            try:
                rebuild_structure(self.model, plan)
            except ValueError as e:
                raise PlanMismatchError(f"compression stage {i + 1} of {what} does not fit this model ({self.hparams.source}): {e}") from e
            self.plans.append(plan)
        self._all_trainable()  # as after the live stages, so the optimizer holds the same parameters

    def start_from_export(self, directory: str | Path) -> None:
        """Make the model the compressed one in ``directory``: an export of this module's dense source by a
        flatten method (``flatten-compress --out``, ExportCallback), to be recovered here.

        Its report's plans are replayed on the dense structure, then its weights are loaded; the dense model
        stays the teacher, and the plans give hidden-state distillation its groups. Like a checkpoint, it
        needs the freshly loaded dense module. A report written later by ExportCallback lists only the
        stages run in that fit, not this directory's.
        """
        directory = Path(directory)
        path = directory / REPORT_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{directory} has no {REPORT_NAME}: it is not a compressed export. Fix: pass the --out of flatten-compress."
            )
        report = json.loads(path.read_text(encoding="utf-8"))
        plans = plans_of(report)
        if not plans:
            raise ValueError(
                f"{directory} was made by method {report.get('method')!r}, whose report holds no FlattenGPT plan to rebuild. "
                "Fix: pass an export of a flatten method (flatten, flatten-paper)."
            )
        if not same_source(report.get("source", ""), self.hparams.source):
            raise PlanMismatchError(
                f"{directory} was compressed from {report.get('source')!r}, but this module's source is {self.hparams.source!r}. "
                "Fix: set the source to the dense model the export was made from."
            )
        self._replay(plans, str(directory), "start_from_export")
        compressed, _ = load_model(str(directory), DTYPES[self.hparams.dtype])
        weights = compressed.state_dict()
        self._check_weights_fit({f"model.{k}": v for k, v in weights.items()}, str(directory), "pass an unmodified export of this source")
        self.model.load_state_dict(weights)

    def _check_weights_fit(
        self,
        saved: dict[str, torch.Tensor],
        what: str = "the checkpoint",
        fix: str = "resume with the same model source and an unmodified checkpoint",
    ) -> None:
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
                    f"{len(shapes)} tensors differ in shape, e.g. {k}: saved {tuple(saved[k].shape)} vs rebuilt {tuple(mine[k].shape)}"
                )
            if missing:
                details.append(f"{len(missing)} tensors missing from {what}, e.g. {missing[0]}")
            if extra:
                details.append(f"{len(extra)} unexpected tensors in {what}, e.g. {extra[0]}")
            raise PlanMismatchError(
                f"{what}'s compression plan does not match its weights on this model: " + "; ".join(details) + f". Fix: {fix}."
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
        alpha, beta = self.hparams.distill_alpha, self.hparams.distill_hidden
        with block_outputs(self.student_blocks()) if beta > 0 else nullcontext([]) as hidden:
            logits = self.seeded(batch)[:, :-1]
        target = batch[:, 1:]
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))
        loss = ce
        if alpha > 0 or beta > 0:
            t_logits, t_hidden = self.teacher_outputs(batch, logits=alpha > 0, blocks=self.teacher_indices() if beta > 0 else [])
        if alpha > 0:
            kd = logit_distillation(logits, t_logits[:, :-1], self.hparams.distill_temperature)
            loss = (1 - alpha) * ce + alpha * kd
            self.log("train_kd", kd, prog_bar=False, sync_dist=False)
        if beta > 0:
            hd = hidden_distillation(hidden, t_hidden, self.hparams.distill_hidden_norm)
            loss = loss + beta * hd
            self.log("train_hidden", hd, prog_bar=False, sync_dist=False)
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

    def student_blocks(self) -> list[nn.Module]:
        """The compressed model's decoder blocks, in order (under any LoRA wrapper); needs distill_hidden > 0."""
        return list(self.__dict__["_adapters"][0].blocks())

    def teacher_indices(self) -> list[int]:
        """g(i) for every block i of the compressed model: the dense block whose output block i stands for."""
        return teacher_blocks(compose_groups(self.plans, self.original_layers))

    @torch.no_grad()
    def teacher_outputs(self, batch: torch.Tensor, logits: bool, blocks: list[int]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """One forward of the frozen dense model on ids [B, T]: its logits [B, T, V] (if ``logits``) and the
        outputs [B, T, D] of its blocks ``blocks`` (in that order; an index may repeat)."""
        teacher = self.teacher()
        dense = list(self.__dict__["_adapters"][1].blocks()) if blocks else []
        wanted = sorted(set(blocks))
        # Without logits, the decoder alone (no LM head: a [B, T, V] product saved).
        run = teacher if logits else teacher.base_model
        with block_outputs([dense[j] for j in wanted]) as outs:
            out = run(input_ids=batch, use_cache=False)
        at = dict(zip(wanted, outs))
        return (out.logits if logits else None), [at[j] for j in blocks]

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        logits = self(batch)
        self.val_ppl.update(logits[:, :-1].float(), batch[:, 1:])
        self.log("val_ppl", self.val_ppl, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        """AdamW over the trainable parameters only (after LoRA: the adapters), with the lr schedule if any.

        The schedule reads the trainer's global step, not its own count: this is called again after every
        compression stage (the optimizer is rebuilt), and a resumed fit restores the step.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: every weight is frozen")
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        schedule, warmup = self.hparams.lr_schedule, self.hparams.warmup_steps
        if schedule == "constant" and not warmup:
            return opt
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(f"lr_schedule '{schedule}' needs a known length. Fix: set trainer.max_steps (or max_epochs).")
        trainer = self.trainer
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: lr_factor(trainer.global_step, int(total), warmup, schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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
