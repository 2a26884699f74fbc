"""LoRACallback: LoRA adapters for recovery after the last compression stage, merged at the end.

When: with a ``FlattenCallback`` in the trainer, right after its last stage (it calls
``on_flatten_stage_end``), so the optimizer it rebuilds already holds only the adapters; without one,
at ``on_train_start``. Never at ``setup``: a resumed run gets its adapters back from the checkpoint
(``FlattenModule.on_load_checkpoint``), which needs the dense model first.

At ``on_fit_end`` the adapters are merged into the weights (peft ``merge_and_unload``), so the
export is a plain Hugging Face model (after ``on_train_end``, where ModelCheckpoint may still save a
last checkpoint that must keep the adapters its optimizer state refers to). A target module the model lacks fails at ``setup``, naming it
and the Linear names that exist.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from callbacks.compression import FlattenCallback
from callbacks.strategy import refresh_after_structure_change
from flatten_lightning.lightning.module import FlattenModule
from flatten_lightning.lora import LoraSpec, check_targets, resolve_targets


def _canonical(value: Any) -> Any:
    return sorted(value) if isinstance(value, list) else value  # target order does not change the structure


class LoRACallback(Callback):
    """Adapters on the given projections (paper: r=8 on q/k/v/o/gate/up/down), merged before export.

    Args:
        r: adapter rank.
        alpha: LoRA scaling numerator (scale = alpha / r).
        dropout: dropout on the adapter input.
        target_modules: Linear module names to adapt (matched on the last name component); null = every
            projection of the model family (its adapter's lora_targets).
        seed: initialisation seed of the adapters.
    """

    def __init__(self, r: int = 8, alpha: int = 16, dropout: float = 0.05, target_modules: list[str] | None = None, seed: int = 0) -> None:
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.spec = LoraSpec(r, alpha, dropout, list(target_modules or []), seed)
        self.applied = False

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "spec": self.spec.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint made with another rank, alpha or targets (its adapters would win silently)."""
        theirs, mine = state.get("spec") or {}, self.spec.to_dict()
        for key in ("r", "alpha", "target_modules"):
            if key in theirs and _canonical(theirs[key]) != _canonical(mine[key]):
                raise ValueError(
                    f"resume refused: the checkpoint was made with LoRACallback {key}={theirs[key]}, this config has {key}={mine[key]}. "
                    "Fix: resume with the checkpoint's setting, or start a new run without --ckpt_path."
                )
        self.applied = bool(state["applied"])

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(pl_module, FlattenModule):
            raise TypeError(f"LoRACallback needs a FlattenModule, got {type(pl_module).__name__}")
        self.spec = resolve_targets(pl_module.base_model, self.spec)  # null targets: the family's projections
        check_targets(pl_module.base_model, self.spec.target_modules)

    @staticmethod
    def _flatten_callback(trainer: Trainer) -> FlattenCallback | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, FlattenCallback)), None)

    def _apply(self, pl_module: FlattenModule) -> None:
        pl_module.attach_lora(self.spec)
        self.applied = True
        rank_zero_info(
            f"LoRA r={self.spec.r} on {', '.join(self.spec.target_modules)}: "
            f"{pl_module.trainable_parameters() / 1e6:.3f}M trainable parameters"
        )

    def on_flatten_stage_end(self, trainer: Trainer, pl_module: FlattenModule, last: bool) -> None:
        """Called by FlattenCallback after each stage; the caller rebuilds the optimizer afterwards."""
        if last and not self.applied:
            self._apply(pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.applied:
            if pl_module.lora_spec is None:
                raise RuntimeError("the checkpoint says LoRA adapters were added but the restored model has none")
            return
        if self._flatten_callback(trainer) is None:  # no compression in this fit: adapt right away
            self._apply(pl_module)
            refresh_after_structure_change(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After on_train_end, where ModelCheckpoint may save last.ckpt: that one keeps the adapters.
        pl_module.merge_lora()
