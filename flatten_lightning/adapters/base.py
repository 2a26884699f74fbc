"""The adapter contract: everything family-specific about a model, behind one small class.

A pre-norm block l maps its input h to
    u = h + A_l(h),   out = u + M_l(u),   A_l(h) = Attn_l(N_l(h)),   M_l(u) = MLP_l(N'_l(u)),
and the algorithms (flatten, prune, calibrate, compress, the baselines, LoRA) only ever ask an adapter
for these pieces: the blocks, how to run one standalone, the two branches A and M, and the block's
weights as one family-neutral record (``BlockWeights``) that they read, transform and write back.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from transformers import PreTrainedModel

Sub = Literal["attn", "mlp"]


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
        """Query heads per KV head (GQA group size; 1 for plain multi-head attention)."""
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class Affine:
    """y = x W^T + b of one projection: ``weight`` [out, in], ``bias`` [out] or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class Norm:
    """A pre-norm's affine part: RMSNorm y = g * x / rms(x) (``shift`` None), LayerNorm adds ``shift`` b."""

    scale: torch.Tensor  # g [D]
    shift: torch.Tensor | None = None  # b [D] (LayerNorm only)


@dataclass(frozen=True)
class BlockWeights:
    """The weights of one block in family-neutral form (what flatten and prune transform).

    Projections are *effective*: a per-channel output scale (LayerScale) is already folded into o and
    down, and fused projections (Phi-3's qkv_proj, gate_up_proj) are split. ``gate`` is None for a
    plain (non-gated) MLP act(x W_up^T + b_up). Head and KV-head counts follow from the row counts.
    """

    attn_norm: Norm
    mlp_norm: Norm
    q: Affine
    k: Affine
    v: Affine
    o: Affine
    up: Affine
    down: Affine
    gate: Affine | None = None

    def with_(self, **changes: Any) -> BlockWeights:
        return replace(self, **changes)


def linear(p: Affine) -> nn.Linear:
    """A trainable ``nn.Linear`` holding exactly ``p`` (dtype/device kept).

    Surgery runs under no_grad, so the source tensors say nothing about trainability: new modules are
    trainable like any freshly built layer, and recovery (LoRA or full) freezes what it wants.
    """
    out_f, in_f = p.weight.shape
    mod = nn.Linear(in_f, out_f, bias=p.bias is not None, device="meta")
    mod.weight = nn.Parameter(p.weight.detach().clone())
    if p.bias is not None:
        mod.bias = nn.Parameter(p.bias.detach().clone())
    return mod


def affine_of(mod: nn.Linear) -> Affine:
    return Affine(mod.weight, mod.bias)


class ModelAdapter:
    """Family-specific knowledge about one loaded model (``self.model``); subclasses fill it in.

    Model level: ``blocks``, ``layout``, ``intermediate_size``, ``embed`` (what runs before the first
    block), ``context`` (rotary / position inputs a standalone block needs), ``run_block``,
    ``install`` (make a block list the model's, with the config updated), ``final_norm`` / ``lm_head``
    (language models: scoring), ``max_window``. Block level: the branches ``attention`` (A) and ``mlp``
    (M), the modules whose inputs are the head outputs (``o_module``) and channel activations
    (``down_module``), ``read`` / ``write`` of ``BlockWeights``, and, for the peers, ``sub_modules``
    and ``transplant_mlp``. Class level: ``model_types``, ``lora_targets``, ``auto_class``.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    lora_targets: ClassVar[tuple[str, ...]] = ()
    auto_class: ClassVar[str] = "AutoModelForCausalLM"  # how a plain transformers user loads the export

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.check()

    @property
    def config(self) -> Any:
        return self.model.config

    # ---------------------------------------------------------------------------------- model level
    def check(self) -> None:
        """Raise ``UnsupportedArchitectureError`` naming the first feature that cannot be flattened exactly."""

    def fail(self, feature: str) -> None:
        raise UnsupportedArchitectureError(
            f"model_type '{self.config.model_type}' is not supported: {feature}. "
            f"The {type(self).__name__} handles {', '.join(self.model_types)} models without it."
        )

    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def set_blocks(self, blocks: list[nn.Module]) -> None:
        raise NotImplementedError

    def layout(self) -> HeadLayout:
        raise NotImplementedError

    def intermediate_size(self) -> int:
        return int(self.config.intermediate_size)

    def embed_module(self) -> nn.Module:
        """The module ``embed`` runs (moved to the compute device alone when offloading)."""
        raise NotImplementedError

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Model inputs (token ids [N, T], or pixels) -> the first block's input h_0 [N, T, D]."""
        return self.embed_module()(inputs)

    def context(self, h: torch.Tensor) -> dict[str, Any]:
        """Keyword inputs every block needs besides h (e.g. rotary cos/sin), for hidden states like ``h``."""
        return {}

    def run_block(self, block: nn.Module, h: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        """out = block(h) [N, T, D] in eval mode, with no padding mask (full causal windows or images)."""
        raise NotImplementedError

    def install(self, blocks: list[nn.Module], groups: list[list[int]]) -> None:
        """Make ``blocks`` the model's blocks; ``groups[i]`` are the original blocks block i holds.

        Updates the depth in the config and anything per layer (layer_types, layer_idx).
        """
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} has no language-model head")

    def lm_head(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} has no language-model head")

    def max_window(self) -> int | None:
        """Longest calibration window the blocks attend over without a mask (a sliding window), or None."""
        return None

    # ---------------------------------------------------------------------------------- block level
    def attention(self, block: nn.Module, h: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        """A(h) = Attn(N(h)): the attention branch added to the residual stream [N, T, D]."""
        raise NotImplementedError

    def mlp(self, block: nn.Module, u: torch.Tensor) -> torch.Tensor:
        """M(u) = MLP(N'(u)): the MLP branch added to the residual stream [N, T, D]."""
        raise NotImplementedError

    def o_module(self, block: nn.Module) -> nn.Linear:
        """The output projection; its input is the concatenated head outputs z [.., H d]."""
        raise NotImplementedError

    def down_module(self, block: nn.Module) -> nn.Linear:
        """The MLP output projection; its input is the channel activations psi [.., I]."""
        raise NotImplementedError

    def read(self, block: nn.Module) -> BlockWeights:
        raise NotImplementedError

    def write(self, block: nn.Module, w: BlockWeights) -> None:
        """Replace ``block``'s weights (and head counts, derived from the row counts) with ``w`` in place."""
        raise NotImplementedError

    def sub_modules(self, block: nn.Module, sub: Sub) -> list[nn.Module]:
        """The modules of a sub-block, its norm last (parameter counts; LaCo merges all but the norm)."""
        raise NotImplementedError

    def norm_of(self, block: nn.Module, sub: Sub) -> nn.Module:
        """The norm a sub-block applies to its input (``sub_modules``' last): h -> g * n(h) (+ b)."""
        return self.sub_modules(block, sub)[-1]

    def transplant_mlp(self, dst: nn.Module, src: nn.Module) -> None:
        """Give ``dst`` a copy of ``src``'s MLP sub-block (norm included), in place."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------- derived
    def heads_of(self, w: BlockWeights) -> tuple[int, int]:
        """(query heads, KV heads) of ``w`` from its row counts."""
        d = self.layout().head_dim
        return w.q.weight.shape[0] // d, w.k.weight.shape[0] // d

    def is_plain(self) -> bool:
        """True when every block has the widths the config states, so save_pretrained gives a plain model."""
        lay, inter = self.layout(), self.intermediate_size()
        for b in self.blocks():
            w = self.read(b)
            if self.heads_of(w) != (lay.n_heads, lay.n_kv_heads) or w.up.weight.shape[0] != inter:
                return False
        return len(self.blocks()) == self.config.num_hidden_layers
