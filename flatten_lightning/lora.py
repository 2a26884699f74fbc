"""LoRA adapters for recovery after compression (peft), as plain functions on Hugging Face models.

Kept out of ``callbacks/`` because two places need the same structure: the LoRA callback adds the
adapters during training, and ``FlattenModule.on_load_checkpoint`` must recreate them (same config,
same module names) before a checkpoint's weights load. The adapter weights themselves always come
from training or from the checkpoint; the seed only makes a fresh initialisation reproducible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from flatten_lightning.adapters import get_adapter


@dataclass
class LoraSpec:
    """Adapter settings (paper: r=8 on every projection); stored in checkpoints and the report."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=list)  # empty: every projection (the adapter's lora_targets)
    seed: int = 0  # initialisation of lora_A (lora_B starts at zero, so the model is unchanged)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LoraSpec:
        return cls(**d)


def resolve_targets(model: nn.Module, spec: LoraSpec) -> LoraSpec:
    """``spec`` with empty ``target_modules`` replaced by the model family's projections (adapter.lora_targets)."""
    if spec.target_modules:
        return spec
    from peft import PeftModel  # a wrapped model's family is its base model's

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return replace(spec, target_modules=list(get_adapter(base).lora_targets))


def linear_names(model: nn.Module) -> list[str]:
    """Distinct last name components of the model's ``nn.Linear`` modules (what peft matches on)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Raise ``ValueError`` naming every target that matches no ``nn.Linear`` of ``model``.

    peft only fails when *no* target matches and silently skips the others, so a typo such as
    ``gate_prj`` would train fewer adapters than asked for; this check refuses it up front.
    """
    available = linear_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        raise ValueError(
            f"LoRA target module(s) {', '.join(repr(t) for t in missing)} not found in the model "
            f"({type(model).__name__}). Available Linear module names: {', '.join(available)}. "
            "Fix: set target_modules to names from that list."
        )


def is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def add_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Wrap ``model`` with LoRA adapters per ``spec``; returns the peft model (base weights frozen).

    The initialisation runs under a forked RNG seeded with ``spec.seed`` so that adding adapters
    neither depends on nor disturbs the global random stream (resumed runs stay bit-identical).
    """
    from peft import LoraConfig, get_peft_model

    spec = resolve_targets(model, spec)
    check_targets(model, spec.target_modules)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        # A causal LM gets peft's causal-LM wrapper (generation); other models (vision encoders) the plain
        # PeftModel, whose forward passes its arguments through (the causal one would send input_ids).
        task_type="CAUSAL_LM" if get_adapter(model).auto_class == "AutoModelForCausalLM" else None,
    )
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(spec.seed)
        return get_peft_model(model, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights; returns the plain model (unchanged if not peft)."""
    if not is_peft(model):
        return model
    return model.merge_and_unload()
