"""FlattenCallback: run FlattenGPT compression stages at scheduled training steps.

A stage at global step s runs at the first ``on_train_batch_start`` that sees ``global_step >= s``
(step 0: ``on_train_start``, before any training): calibrate on the datamodule's calibration windows,
``flatten_gpt`` to the stage's depth, then rewrap DDP and rebuild the optimizer so that it holds
exactly the new parameters. Recovery between stages trains every parameter; LoRA adapters (see
``callbacks.lora_adapters``) come after the last stage.

Distributed: each rank calibrates on its shard (rows rank, rank + world, ...) and every float64
statistic sum is all-reduced, so all ranks take the same decisions; the plans are then compared
across ranks and a disagreement stops the run.

State: the stages done (plans, timings, perplexities) are callback state *and* the module writes the
plans into the checkpoint, from which a resumed run rebuilds the structure before the weights load;
the schedule then continues where it stopped. A resume whose schedule, method, group limit or ridge
differs from the checkpoint's is refused, naming both values.

Under FSDP (sharded parameters) compress before wrapping or between fits, see
``callbacks.strategy``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from callbacks.strategy import all_reduce_sum, check_strategy, gather_objects, refresh_after_structure_change
from flatten_lightning.compress import Plan, flatten_gpt
from flatten_lightning.export import count_parameters
from flatten_lightning.lightning.module import FlattenModule, PlanMismatchError
from flatten_lightning.lora import is_peft
from flatten_lightning.methods import RECIPE_FIELDS, compress_config
from flatten_lightning.report import stage_record


@dataclass
class Stage:
    """One scheduled compression stage: at global step ``step``, compress to ``target_layers`` blocks."""

    step: int
    target_layers: int


class ScheduleError(ValueError):
    """The compression schedule cannot be run (order, depths, or past the end of training)."""


def _as_stage(s: Stage | dict) -> Stage:
    return s if isinstance(s, Stage) else Stage(**s)


def validate_schedule(stages: list[Stage]) -> None:
    """Steps >= 0 strictly increasing, depths >= 1 strictly decreasing (model-independent checks)."""
    if not stages:
        raise ScheduleError("the compression schedule is empty. Fix: give at least one {step, target_layers} stage.")
    for i, s in enumerate(stages):
        if s.step < 0:
            raise ScheduleError(f"schedule stage {i + 1} has step {s.step}; steps must be >= 0")
        if s.target_layers < 1:
            raise ScheduleError(f"schedule stage {i + 1} asks for {s.target_layers} layers; at least 1 is needed")
        if i and s.step <= stages[i - 1].step:
            raise ScheduleError(
                f"schedule steps must be strictly increasing: stage {i + 1} at step {s.step} comes after a stage at step "
                f"{stages[i - 1].step}. Fix: order the stages by step."
            )
        if i and s.target_layers >= stages[i - 1].target_layers:
            raise ScheduleError(
                f"schedule depths must decrease: stage {i + 1} targets {s.target_layers} layers after a stage that "
                f"already reached {stages[i - 1].target_layers}. Fix: give each stage fewer layers than the one before."
            )


def plan_fingerprint(plan: Plan) -> str:
    """A digest of the decisions of a plan (no timings), for comparing ranks and checking a resume."""
    decisions = json.dumps([[s.position, s.members, s.kept_kv_groups, s.kept_channels] for s in plan.steps])
    return hashlib.sha256(decisions.encode()).hexdigest()[:16]


class FlattenCallback(Callback):
    """Compress the model at scheduled steps (default: one stage at step 0, i.e. one-shot).

    Args:
        target_layers: depth of a one-shot compression at step 0 (shorthand for ``schedule``).
        schedule: stages ``[{step, target_layers}, ...]``; steps strictly increasing, depths decreasing.
        method: ``flatten`` (ours: sequential-target refit) or ``flatten-paper`` (the paper's recipe).
        max_group_size: most original blocks one new block may hold (0 = no limit).
        fit_ridge: ridge of the least-squares corrections (``flatten`` only): a number times the kept Gram's
            mean eigenvalue, ``gcv`` (chosen per fit by generalized cross-validation) or ``cv`` (by
            cross-validation over folds of whole calibration windows); null = the method's recipe (flatten: cv;
            fast or fewer windows than cv_folds: 0.1).
        correction: fit target (``flatten`` only): ``sequential`` (the original blocks) or ``flattened``;
            null = the method's recipe.
        feedback: error feedback (``flatten`` only): fraction in [0, 1] of the gap to the dense model's
            hidden state after a group that its MLP correction also closes; null = the method's recipe.
        ridge_floor: with ``fit_ridge: gcv``, the least relative ridge GCV may choose; null = the method's recipe.
        cv_folds: with ``fit_ridge: cv``, folds of calibration windows (window i in fold i mod N); null = 4.
        refit_passes: re-fit passes over the merged blocks after the last merge (``flatten`` only);
            null = the method's recipe.
        head_score: how heads are chosen (``flatten`` only): ``importance`` (the paper's), ``leverage``
            (ridge leverage of the head outputs) or ``loss`` (backward elimination under the o_proj refit's
            objective); null = the method's recipe.
        channel_score: how MLP channels are chosen (``flatten`` only): ``leverage`` (the paper's ridge leverage),
            ``energy`` (sqrt(E psi^2) times the down_proj column norm; no 2I x 2I Gram) or ``loss`` (backward
            elimination under the down_proj fit's objective); null = the method's recipe (loss; energy in fast mode).
        candidates: pairs tried per step (``flatten`` only): the N most similar are each fitted and the one
            whose model ends nearest the dense one is kept (fast mode: the one of least parallel error,
            fitted alone); null = the method's recipe (flatten: 3).
        trial_holdout: with candidates > 1, fit each candidate without every N-th calibration window and
            score it on those (the chosen pair is then fitted on all); null = the method's recipe (0: off).
        fast: fast mode (``flatten`` only): after a merge only the merged block's similarity is measured
            again, not every later block's; null = the method's recipe (off).
        input_fit: re-fit each flattened part's q/k/v and gate/up rows to what it read when the parts ran in
            sequence (``flatten`` only); null = the method's recipe (on; off in fast mode).
        offload: keep blocks on the CPU and move each to the device only while it works.
        input_stride: keep every k-th block's calibration input (null = ceil(sqrt(depth)); 0 = none).
        batch_size: calibration windows per forward.
        eval_perplexity: measure held-out perplexity before compression and after each stage.
        progress: progress bars on calibration passes (rank 0 only).
    """

    def __init__(
        self,
        target_layers: int | None = None,
        schedule: list[Stage] | None = None,
        method: Literal["flatten", "flatten-paper"] = "flatten",
        max_group_size: int = 0,
        fit_ridge: float | Literal["gcv", "cv"] | None = None,
        correction: Literal["sequential", "flattened"] | None = None,
        feedback: float | None = None,
        ridge_floor: float | None = None,
        cv_folds: int | None = None,
        refit_passes: int | None = None,
        head_score: Literal["importance", "leverage", "loss"] | None = None,
        channel_score: Literal["leverage", "energy", "loss"] | None = None,
        candidates: int | None = None,
        trial_holdout: int | None = None,
        fast: bool | None = None,
        input_fit: bool | None = None,
        offload: bool = False,
        input_stride: int | None = None,
        batch_size: int = 4,
        eval_perplexity: bool = True,
        progress: bool = True,
    ) -> None:
        if (target_layers is None) == (schedule is None):
            raise ScheduleError("give exactly one of target_layers (one-shot at step 0) or schedule")
        self.schedule = [Stage(0, target_layers)] if schedule is None else [_as_stage(s) for s in schedule]
        validate_schedule(self.schedule)
        self.method = method
        # CompressConfig fields; None = the method's recipe. Checked now, before any model is loaded.
        given = dict(
            fit_ridge=fit_ridge,
            correction=correction,
            feedback=feedback,
            ridge_floor=ridge_floor,
            cv_folds=cv_folds,
            refit_passes=refit_passes,
            head_score=head_score,
            channel_score=channel_score,
            candidates=candidates,
            trial_holdout=trial_holdout,
            fast=fast,
            input_fit=input_fit,
            input_stride=input_stride,
        )
        self.settings = dict(max_group_size=max_group_size, offload=offload, batch_size=batch_size)
        self.settings.update({k: v for k, v in given.items() if v is not None})
        compress_config(method, 1, **self.settings)
        self.eval_perplexity, self.progress = eval_perplexity, progress
        # State (checkpointed): stages done, their records, and the dense perplexity.
        self.history: list[dict] = []
        self.ppl_before: float | None = None

    # ------------------------------------------------------------------------------------- state
    @property
    def done(self) -> int:
        return len(self.history)

    @property
    def finished(self) -> bool:
        return self.done == len(self.schedule)

    def _settings(self) -> dict[str, Any]:
        """What decides the compressed structure: a resume must use the same."""
        return {
            "schedule": [asdict(s) for s in self.schedule],
            "method": self.method,
            # Recipe settings (offload, input_stride and batch_size change where and how fast, not what).
            **{k: self.settings.get(k) for k in ("max_group_size", *RECIPE_FIELDS)},
        }

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "ppl_before": self.ppl_before, **self._settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._settings()
        for key, theirs in state.items():  # checkpoints from before a setting was recorded lack its key
            if key in mine and theirs != mine[key]:
                raise ScheduleError(
                    f"resume refused: the checkpoint was made with FlattenCallback {key}={theirs}, this config has {key}={mine[key]}. "
                    "Fix: resume with the checkpoint's setting, or start a new run without --ckpt_path."
                )
        self.history = list(state["history"])
        self.ppl_before = state.get("ppl_before")

    # ------------------------------------------------------------------------------------- checks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Every check that needs the model, before any work (compression starts at on_train_start)."""
        if stage != "fit":
            return
        if not isinstance(pl_module, FlattenModule):
            raise TypeError(f"FlattenCallback needs a FlattenModule, got {type(pl_module).__name__}")
        if not hasattr(trainer.datamodule, "calibration_shard"):
            raise TypeError("FlattenCallback needs the FlattenDataModule (it provides the calibration windows)")
        check_strategy(trainer)
        depth = pl_module.num_layers  # the dense model: a checkpoint's structure is only replayed after setup
        first = self.schedule[0].target_layers
        if first >= depth:
            raise ScheduleError(
                f"target depth {first} is impossible for a model of {depth} layers: it must be at least 1 and less "
                f"than {depth}. Fix: set target_layers (or the first stage's) between 1 and {depth - 1}."
            )
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            late = [s for s in self.schedule if s.step > 0 and s.step >= trainer.max_steps]
            if late:
                raise ScheduleError(
                    f"schedule stage at step {late[0].step} would never run: training stops at max_steps={trainer.max_steps}. "
                    "Fix: raise trainer.max_steps or move the stage earlier."
                )

    def _check_resumed(self, pl_module: FlattenModule) -> None:
        """After a resume, the module's rebuilt plans must be the ones this callback recorded."""
        mine = [h["plan_fingerprint"] for h in self.history]
        theirs = [plan_fingerprint(p) for p in pl_module.plans]
        if mine != theirs:
            raise PlanMismatchError(
                f"the checkpoint's callback state records {len(mine)} compression stage(s) but the model was rebuilt "
                f"with {len(theirs)} different one(s). Fix: resume from an unmodified checkpoint."
            )

    # ------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_resumed(pl_module)
        total = trainer.estimated_stepping_batches
        late = [s for s in self.schedule[self.done :] if s.step > 0 and s.step >= total]
        if late:
            raise ScheduleError(
                f"schedule stage at step {late[0].step} would never run: this fit has {int(total)} optimizer steps. "
                "Fix: train longer or move the stage earlier."
            )
        if self.eval_perplexity and self.ppl_before is None and not self.history:
            self.ppl_before = _perplexity(trainer, pl_module, "before compression")
        self._run_due(trainer, pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._run_due(trainer, pl_module)

    def _run_due(self, trainer: Trainer, pl_module: FlattenModule) -> None:
        ran = False
        while not self.finished and trainer.global_step >= self.schedule[self.done].step:
            self._compress(trainer, pl_module, self.schedule[self.done])
            ran = True
        if ran:
            refresh_after_structure_change(trainer)

    def _compress(self, trainer: Trainer, pl_module: FlattenModule, stage: Stage) -> None:
        if is_peft(pl_module.model):
            raise RuntimeError("LoRA adapters are present before a compression stage: they must come after the last stage")
        model = pl_module.base_model
        layers_before = model.config.num_hidden_layers
        calib = trainer.datamodule.calibration_shard(trainer.global_rank, trainer.world_size)
        cfg = compress_config(self.method, stage.target_layers, **self.settings)
        rank_zero_info(
            f"compression stage {self.done + 1}/{len(self.schedule)} at step {trainer.global_step}: "
            f"{layers_before} -> {stage.target_layers} layers on {len(calib)} calibration windows per rank"
        )
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        plan = flatten_gpt(
            model,
            calib,
            cfg,
            device=pl_module.device,
            reduce=all_reduce_sum(trainer),
            progress=self.progress and trainer.is_global_zero,
            shard=(trainer.global_rank, trainer.world_size),  # calibration_shard's rows: rank, rank + world, ...
        )
        seconds = time.perf_counter() - t0
        model.train(was_training)
        self._check_ranks_agree(trainer, plan, model)
        pl_module.record_plan(plan)
        last = self.done + 1 == len(self.schedule)
        record = {
            "step": trainer.global_step,
            "target_layers": stage.target_layers,
            "layers_before": layers_before,
            "seconds": seconds,
            "params": count_parameters(model),
            "plan_fingerprint": plan_fingerprint(plan),  # the plan itself is stored once, by the module
        }
        self.history.append(record)
        if self.eval_perplexity:
            record["ppl"] = _perplexity(trainer, pl_module, f"after compression stage {self.done}")
        for cb in trainer.callbacks:  # e.g. LoRA adapters after the last stage, before the optimizer is rebuilt
            hook = getattr(cb, "on_flatten_stage_end", None)
            if hook is not None:
                hook(trainer, pl_module, last)
        metrics = {
            "compress/layers": float(stage.target_layers),
            "compress/params": float(record["params"]),
            "compress/seconds": seconds,
            **({"compress/ppl": record["ppl"]} if "ppl" in record else {}),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"stage {self.done}: {layers_before} -> {stage.target_layers} layers, {record['params'] / 1e6:.2f}M parameters, {seconds:.1f}s"
        )

    def _check_ranks_agree(self, trainer: Trainer, plan: Plan, model: torch.nn.Module) -> None:
        """Same decisions and same fitted weights on every rank (they saw the same reduced statistics)."""
        checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
        seen = gather_objects(trainer, (plan_fingerprint(plan), checksum))
        if any(fp != seen[0][0] for fp, _ in seen):
            raise RuntimeError(f"ranks chose different compression plans at stage {self.done + 1}: {[fp for fp, _ in seen]}")
        sums = [c for _, c in seen]
        if not all(math.isclose(c, sums[0], rel_tol=1e-6, abs_tol=1e-6) for c in sums):
            raise RuntimeError(f"ranks fitted different weights at stage {self.done + 1} (parameter sums {sums})")

    # ------------------------------------------------------------------------------------- report
    def stage_records(self, pl_module: FlattenModule) -> list[dict]:
        """The report's stages: this callback's records with the module's plans (stored once, there)."""
        return [
            stage_record(h["target_layers"], h["layers_before"], h["seconds"], h["params"], plan.to_dict(), h["step"], h.get("ppl"))
            for h, plan in zip(self.history, pl_module.plans)
        ]


def _perplexity(trainer: Trainer, pl_module: FlattenModule, when: str) -> float | None:
    """Held-out perplexity on the validation windows (rank 0 computes, every rank gets the number)."""
    value = None
    if trainer.is_global_zero:
        dm = trainer.datamodule
        value = pl_module.heldout_perplexity(dm.validation_ids, dm.val_seqlen, dm.val_windows, dm.eval_batch_size)
        rank_zero_info(f"perplexity {when}: {value:.3f}")
    return gather_objects(trainer, value)[0]
