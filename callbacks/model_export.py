"""ExportCallback: at the end of fit, write a plain Hugging Face directory and the compression report.

The output directory is checked at ``setup`` (before any work); the write itself is atomic
(``flatten_lightning.export.save_compressed``), so a crash leaves no half-written model. The
after-recovery perplexity is measured in ``on_train_end``, while the model is still on its device
(Lightning moves it to the CPU at teardown); the adapters are merged and rank 0 writes in
``on_fit_end``, after ModelCheckpoint's last save, so that checkpoint still matches its optimizer.

Report (``compression_report.json`` next to the weights, schema in ``flatten_lightning.report``): source, depths, every stage's plan and
timing, perplexity before compression / after compression / after recovery on the same held-out
windows, parameter counts, LoRA settings, data and training settings, timings.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from callbacks.compression import FlattenCallback
from callbacks.lora_adapters import LoRACallback
from flatten_lightning.export import NonFiniteModelError, check_finite, check_output_dir, count_parameters
from flatten_lightning.lightning.module import FlattenModule, last_checkpoint_note
from flatten_lightning.report import build_report


class ExportCallback(Callback):
    """Merge adapters, measure the recovered model and save it with its report.

    Args:
        out_dir: output directory (a Hugging Face model directory afterwards).
        overwrite: replace ``out_dir`` if it exists and is not empty.
        eval_perplexity: measure held-out perplexity after recovery.
    """

    def __init__(self, out_dir: str, overwrite: bool = False, eval_perplexity: bool = True) -> None:
        self.out_dir, self.overwrite, self.eval_perplexity = out_dir, overwrite, eval_perplexity
        self.fit_seconds = 0.0  # accumulated over resumed runs (checkpointed)
        self._t0: float | None = None
        self.last_report: dict | None = None  # the last report written (for callers and tests)

    def state_dict(self) -> dict[str, Any]:
        return {"fit_seconds": self._elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fit_seconds = float(state["fit_seconds"])

    def _elapsed(self) -> float:
        return self.fit_seconds + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(pl_module, FlattenModule):
            raise TypeError(f"ExportCallback needs a FlattenModule, got {type(pl_module).__name__}")
        if stage == "fit" and trainer.is_global_zero:
            dm = trainer.datamodule
            inputs = [
                pl_module.hparams.source,
                *getattr(dm, "calib_files", []),
                *(getattr(dm, a, None) or "" for a in ("val_file", "images")),
                *getattr(dm, "train_files", []),
            ]
            check_output_dir(
                self.out_dir,
                self.overwrite,
                inputs=inputs,
                needed_bytes=pl_module.dense_params * next(pl_module.parameters()).element_size(),
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = time.perf_counter()  # before on_train_start, where the first compression stage runs

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Measure and assemble the report while the model is still on its device (adapters not merged yet).

        Merging and writing wait for ``on_fit_end``: ModelCheckpoint may still save ``last.ckpt`` after
        this hook, and that checkpoint must match the optimizer (adapters present) to stay resumable.
        """
        model = pl_module.base_model
        check_finite(pl_module)  # a diverged model is neither measured nor exported; ModelCheckpoint keeps the last good state
        flat = next((cb for cb in trainer.callbacks if isinstance(cb, FlattenCallback)), None)
        lora = next((cb for cb in trainer.callbacks if isinstance(cb, LoRACallback)), None)
        stages = flat.stage_records(pl_module) if flat is not None else []
        ppl_after = None
        if self.eval_perplexity and trainer.is_global_zero:
            dm = trainer.datamodule
            ppl_after = pl_module.heldout_perplexity(dm.validation_ids, dm.val_seqlen, dm.val_windows, dm.eval_batch_size)
            if not math.isfinite(ppl_after):
                raise NonFiniteModelError(
                    f"held-out perplexity after recovery is {ppl_after}: the model diverged; nothing was exported and "
                    f"{last_checkpoint_note(trainer)}. Fix: lower model.lr and resume from that checkpoint, or restart."
                )
        compression_s = sum(s["seconds"] for s in stages)
        fit_s = self._elapsed()
        data = trainer.datamodule.describe() if hasattr(trainer.datamodule, "describe") else {}
        self.last_report = build_report(
            method=flat.method if flat is not None else "none",
            source=pl_module.hparams.source,
            original_layers=pl_module.original_layers,
            layers=model.config.num_hidden_layers,
            stages=stages,
            calibration=data.get("calibration", {}),
            params={"dense": pl_module.dense_params, "compressed": count_parameters(model)},
            perplexity={
                "before_compression": flat.ppl_before if flat is not None else None,
                "after_compression": stages[-1]["ppl"] if stages else None,
                "after_recovery": ppl_after,  # adapters applied, not yet merged (equal up to rounding)
            },
            timings_s={"compression": compression_s, "recovery": fit_s - compression_s, "fit": fit_s},
            schedule=[asdict(s) for s in flat.schedule] if flat is not None else [],
            settings=dict(flat.settings) if flat is not None else {},
            lora=lora.spec.to_dict() if lora is not None and lora.applied else None,
            training={
                "global_step": trainer.global_step,
                "epochs": trainer.current_epoch,
                "lr": pl_module.hparams.lr,
                "distill_alpha": pl_module.hparams.get("distill_alpha"),  # logit distillation (language models)
                "distill_hidden": pl_module.hparams.get("distill_hidden"),  # hidden-state distillation (language models)
                "distill_hidden_norm": pl_module.hparams.get("distill_hidden_norm"),
                "distill_loss": pl_module.hparams.get("distill_loss"),  # feature distillation (vision backbones)
                "dtype": pl_module.hparams.dtype,
                "devices": trainer.world_size,
            },
            data=data,
        )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Merge the adapters and write the directory (rank 0). The model is on the CPU by now."""
        if self.last_report is None:  # fit ended without training (e.g. max_steps reached before the start)
            return
        pl_module.merge_lora()  # idempotent: LoRACallback may have merged already
        model = pl_module.base_model
        report = self.last_report
        report["params"]["compressed"] = count_parameters(model)  # after merging the adapters
        if trainer.is_global_zero:
            out = pl_module.save_export(self.out_dir, report, overwrite=self.overwrite)  # a vision module adds its decoder
            p = report["perplexity"]
            rank_zero_info(
                f"perplexity before compression {_fmt(p['before_compression'])}, after compression "
                f"{_fmt(p['after_compression'])}, after recovery {_fmt(p['after_recovery'])}; "
                f"{report['original_layers']} -> {report['layers']} layers, "
                f"{report['params']['dense'] / 1e6:.2f}M -> {report['params']['compressed'] / 1e6:.2f}M parameters; wrote {out}"
            )


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
