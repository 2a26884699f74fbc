"""Architecture adapters: which modules are q/k/v/o, gate/up/down and the norms, and head counts.

Supported: pre-norm decoders with RMSNorm, SwiGLU MLP and (grouped-query) attention whose modules
follow the Llama layout: Llama 1/2/3, Mistral, Qwen2 / Qwen1.5 (q/k/v biases). Everything else is
refused up front with the feature that is missing, before any work is done.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Features we know we cannot flatten exactly, with the reason shown to the user.
_REFUSED = {
    "gpt2": "post-norm-free GPT-2 blocks (Conv1D projections, LayerNorm with bias, GELU MLP)",
    "qwen3": "Qwen3's per-head q_norm/k_norm, which does not fold into the projections",
    "gemma": "Gemma's (1 + weight) RMSNorm convention and GeGLU MLP",
    "gemma2": "Gemma-2's post-norms and (1 + weight) RMSNorm",
    "gemma3": "Gemma-3's q_norm/k_norm and post-norms",
    "mixtral": "a mixture-of-experts MLP (MoE)",
    "qwen2_moe": "a mixture-of-experts MLP (MoE)",
    "qwen3_moe": "a mixture-of-experts MLP (MoE)",
    "opt": "OPT's post-norm option, LayerNorm and ReLU MLP",
    "phi3": "fused qkv_proj / gate_up_proj projections",
}


class UnsupportedArchitectureError(ValueError):
    """The model has a feature that flattening cannot handle exactly."""


@dataclass(frozen=True)
class HeadLayout:
    """Attention shape of one (un-flattened) block: H query heads, K KV heads, head size d."""

    n_heads: int  # H
    n_kv_heads: int  # K
    head_dim: int  # d

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.n_heads // self.n_kv_heads


def _fail(model_type: str, feature: str) -> None:
    raise UnsupportedArchitectureError(
        f"model_type '{model_type}' is not supported: {feature}. FlattenGPT here supports pre-norm "
        f"RMSNorm + SwiGLU decoders of types {', '.join(SUPPORTED_MODEL_TYPES)}."
    )


def check_supported(model: PreTrainedModel) -> None:
    """Raise ``UnsupportedArchitectureError`` naming the first unsupported feature of ``model``."""
    cfg = model.config
    mt = getattr(cfg, "model_type", "?")
    if mt in _REFUSED:
        _fail(mt, _REFUSED[mt])
    if mt not in SUPPORTED_MODEL_TYPES:
        _fail(mt, "no adapter for this architecture")
    if getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None):
        _fail(mt, "a mixture-of-experts MLP (MoE)")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        _fail(mt, f"hidden_act '{cfg.hidden_act}' (only SwiGLU with silu is handled)")
    for i, layer in enumerate(decoder_layers(model)):
        attn = layer.self_attn
        for name in ("q_norm", "k_norm"):
            if hasattr(attn, name):
                _fail(mt, f"layer {i} has per-head {name}, which does not fold into the projections")
        for name in ("post_feedforward_layernorm", "pre_feedforward_layernorm"):
            if hasattr(layer, name):
                _fail(mt, f"layer {i} has {name} (post-norm block)")
        for norm_name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, norm_name, None)
            if norm is None or "RMSNorm" not in type(norm).__name__ or getattr(norm, "bias", None) is not None:
                _fail(mt, f"layer {i}.{norm_name} is not a plain RMSNorm")
        for sub, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                mod = getattr(getattr(layer, sub), name, None)
                if not isinstance(mod, nn.Linear):
                    _fail(mt, f"layer {i}.{sub}.{name} is {type(mod).__name__}, not a dense nn.Linear")


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The ModuleList of decoder blocks (``model.model.layers`` for every supported family)."""
    return model.model.layers


def head_layout(model: PreTrainedModel) -> HeadLayout:
    """H, K and d of the model's (original-width) blocks."""
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    k = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if cfg.num_attention_heads % k:
        raise UnsupportedArchitectureError(f"num_attention_heads={cfg.num_attention_heads} is not a multiple of num_key_value_heads={k}")
    return HeadLayout(cfg.num_attention_heads, k, d)


def sliding_window_limit(model: PreTrainedModel) -> int | None:
    """The sliding window, if any block uses one; calibration runs without masks so must stay inside it."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or []
    if window is None:
        return None
    if cfg.model_type == "qwen2" and "sliding_attention" not in types:
        return None
    return int(window)
