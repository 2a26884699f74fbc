"""Model-family adapters: the one seam between the algorithms and a model's modules.

flatten, prune, calibrate, compress, the baselines and LoRA never name a module of a model: they ask
``get_adapter(model)`` (a ``ModelAdapter``, see base.py for the contract and the notation).

Adding a family is one new module here plus its tests. An adapter must provide:
- ``model_types``: the ``config.model_type`` values it handles; ``lora_targets``: the Linear names LoRA adapts;
  ``auto_class``: the transformers Auto class that loads the exported directory.
- ``check()``: refuse, naming it, any feature that does not flatten exactly (q/k norms, post-norms, MoE, ...).
- model level: ``blocks`` / ``set_blocks``, ``layout`` (H, K, d), ``intermediate_size``, ``embed_module`` /
  ``embed`` (what runs before the first block), ``context`` (rotary or other per-call block inputs),
  ``run_block``, ``install`` (block list + config depth + per-layer fields), ``max_window``; language
  models also ``final_norm`` and ``lm_head``.
- block level: ``attention`` (A(h) = Attn(N(h))) and ``mlp`` (M(u) = MLP(N'(u))), exactly as the block
  computes them; ``o_module`` / ``down_module`` (their inputs are head outputs and channel activations);
  ``read`` / ``write`` of ``BlockWeights`` (norm scale and shift, q, k, v, o, gate, up, down as effective
  Affine maps: fused projections split, LayerScale folded into o and down, head counts from row counts);
  ``sub_modules`` and ``transplant_mlp`` for the sub-block peers.

Families: Llama (Llama 1/2/3, SmolLM2), Mistral, Qwen2 (Qwen1.5/2/2.5, q/k/v biases), Phi-3 (fused
qkv_proj / gate_up_proj); vision encoders ViT (ViTModel, ViTForImageClassification), DeiT (distillation
token) and DINOv2 (LayerScale folded into o and down).
"""

from __future__ import annotations

from transformers import PreTrainedModel

from flatten_lightning.adapters.base import (
    Affine,
    BlockWeights,
    HeadLayout,
    ModelAdapter,
    Norm,
    Sub,
    UnsupportedArchitectureError,
    linear,
)
from flatten_lightning.adapters.deit import DeiTAdapter
from flatten_lightning.adapters.dinov2 import Dinov2Adapter
from flatten_lightning.adapters.llama import LlamaAdapter
from flatten_lightning.adapters.mistral import MistralAdapter
from flatten_lightning.adapters.phi3 import Phi3Adapter
from flatten_lightning.adapters.qwen2 import Qwen2Adapter
from flatten_lightning.adapters.vit import ViTAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    t: a for a in (LlamaAdapter, MistralAdapter, Qwen2Adapter, Phi3Adapter, ViTAdapter, DeiTAdapter, Dinov2Adapter) for t in a.model_types
}

# Families we know we cannot flatten exactly, with the reason shown to the user.
REFUSED = {
    "gpt2": "GPT-2 blocks (Conv1D projections, LayerNorm with bias, GELU MLP) have no adapter yet",
    "qwen3": "Qwen3's per-head q_norm/k_norm, which does not fold into the projections",
    "gemma": "Gemma's (1 + weight) RMSNorm convention and GeGLU MLP",
    "gemma2": "Gemma-2's post-norms and (1 + weight) RMSNorm",
    "gemma3": "Gemma-3's q_norm/k_norm and post-norms",
    "mixtral": "a mixture-of-experts MLP (MoE)",
    "qwen2_moe": "a mixture-of-experts MLP (MoE)",
    "qwen3_moe": "a mixture-of-experts MLP (MoE)",
    "opt": "OPT's post-norm option, LayerNorm and ReLU MLP",
}


def register(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    """Add an adapter class for its ``model_types`` (usable as a class decorator)."""
    for t in adapter.model_types:
        ADAPTERS[t] = adapter
    return adapter


def get_adapter(model: PreTrainedModel) -> ModelAdapter:
    """The adapter for ``model``; ``UnsupportedArchitectureError`` names what is missing, before any work."""
    mt = getattr(model.config, "model_type", "?")
    if mt in REFUSED:
        raise UnsupportedArchitectureError(f"model_type '{mt}' is not supported: {REFUSED[mt]}.")
    if mt not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"model_type '{mt}' is not supported: no adapter for this architecture. Supported: {', '.join(sorted(ADAPTERS))}. "
            "Fix: add an adapter (flatten_lightning/adapters/, see its package docstring)."
        )
    return ADAPTERS[mt](model)


__all__ = [
    "ADAPTERS",
    "Affine",
    "BlockWeights",
    "HeadLayout",
    "ModelAdapter",
    "Norm",
    "Sub",
    "UnsupportedArchitectureError",
    "get_adapter",
    "linear",
    "register",
]
