"""ViT family (HF ``ViTModel`` / ``ViTForImageClassification``; DeiT and DINOv2 subclass it): pre-LayerNorm
encoder blocks with plain multi-head attention and a plain (non-gated) GELU MLP.

Module layout: ``base.layers[i]`` (``base`` the ``ViTModel``, also inside a classifier) with
``layernorm_before``, ``attention.{q,k,v,o}_proj``, ``layernorm_after``, ``mlp.fc1`` (up) and
``mlp.fc2`` (down). The LayerNorms' scale and shift fold exactly into q/k/v and fc1 (weights and
biases), so flattening is exact as for RMSNorm. No rotary or mask: a block needs only h. Stock
``ViTAttention`` reshapes with ``view(..., -1, head_dim)``, so a block with 2H heads runs unchanged.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from flatten_lightning.adapters.base import Affine, BlockWeights, HeadLayout, ModelAdapter, Norm, Sub, affine_of, linear


class ViTAdapter(ModelAdapter):
    model_types = ("vit",)
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
    auto_class = "AutoModel"
    # Module names inside one block (DINOv2 renames the norms and adds LayerScale).
    attn_norm_name, mlp_norm_name = "layernorm_before", "layernorm_after"
    attn_scale_name: str | None = None
    mlp_scale_name: str | None = None

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if self.base() is not model:  # a classifier: the export loads with its head
            self.auto_class = "AutoModelForImageClassification"

    def base(self) -> nn.Module:
        """The bare encoder model (``ViTModel``), also when ``model`` is a classifier around it."""
        return self.model.base_model

    # ---------------------------------------------------------------------------------- checks
    def check(self) -> None:
        for i, block in enumerate(self.blocks()):
            for name in (self.attn_norm_name, self.mlp_norm_name):
                norm = getattr(block, name, None)
                if not isinstance(norm, nn.LayerNorm) or norm.weight is None:
                    self.fail(f"layer {i}.{name} is not a LayerNorm with a weight")
            for path in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"):
                try:
                    mod = block.get_submodule(path)
                except AttributeError:
                    mod = None
                if not isinstance(mod, nn.Linear):
                    self.fail(f"layer {i}.{path} is {type(mod).__name__}, not a dense nn.Linear")

    # ---------------------------------------------------------------------------------- model level
    def blocks(self) -> nn.ModuleList:
        return self.base().layers

    def set_blocks(self, blocks: list[nn.Module]) -> None:
        self.base().layers = nn.ModuleList(blocks)

    def layout(self) -> HeadLayout:
        cfg = self.config
        return HeadLayout(cfg.num_attention_heads, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads)

    def embed_module(self) -> nn.Module:
        return self.base().embeddings

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Pixels [N, C, H, W] -> CLS (+ distillation) and patch tokens [N, T, D], position embeddings added."""
        emb = self.embed_module()
        return emb(inputs.to(emb.patch_embeddings.projection.weight.dtype))

    def run_block(self, block: nn.Module, h: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        return block(h, None)  # every token attends to every token: no mask

    def install(self, blocks: list[nn.Module], groups: list[list[int]]) -> None:
        self.set_blocks(blocks)
        self.config.num_hidden_layers = len(blocks)

    def final_norm(self) -> nn.Module:
        """The LayerNorm after the last block (its output is ``last_hidden_state``)."""
        return self.base().layernorm

    # ---------------------------------------------------------------------------------- block level
    def _scaled(self, block: nn.Module, name: str | None, x: torch.Tensor) -> torch.Tensor:
        return x if name is None else getattr(block, name)(x)

    def attention(self, block: nn.Module, h: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        out, _ = block.attention(getattr(block, self.attn_norm_name)(h), None)
        return self._scaled(block, self.attn_scale_name, out)

    def mlp(self, block: nn.Module, u: torch.Tensor) -> torch.Tensor:
        return self._scaled(block, self.mlp_scale_name, block.mlp(getattr(block, self.mlp_norm_name)(u)))

    def o_module(self, block: nn.Module) -> nn.Linear:
        return block.attention.o_proj

    def down_module(self, block: nn.Module) -> nn.Linear:
        return block.mlp.fc2

    def _effective(self, block: nn.Module, mod: nn.Linear, scale_name: str | None) -> Affine:
        """The projection with the branch's LayerScale (if any) folded in: diag(lambda) W, lambda * b."""
        if scale_name is None:
            return affine_of(mod)
        lam = getattr(block, scale_name).lambda1
        return Affine(mod.weight * lam[:, None], None if mod.bias is None else mod.bias * lam)

    def read(self, block: nn.Module) -> BlockWeights:
        a, m = block.attention, block.mlp
        an, mn = getattr(block, self.attn_norm_name), getattr(block, self.mlp_norm_name)
        return BlockWeights(
            attn_norm=Norm(an.weight, an.bias),
            mlp_norm=Norm(mn.weight, mn.bias),
            q=affine_of(a.q_proj),
            k=affine_of(a.k_proj),
            v=affine_of(a.v_proj),
            o=self._effective(block, a.o_proj, self.attn_scale_name),
            up=affine_of(m.fc1),
            down=self._effective(block, m.fc2, self.mlp_scale_name),
        )

    @torch.no_grad()
    def write(self, block: nn.Module, w: BlockWeights) -> None:
        if w.gate is not None:
            raise ValueError(f"{type(self).__name__}: a ViT MLP has no gate projection to hold BlockWeights.gate")
        for name, new in ((self.attn_norm_name, w.attn_norm), (self.mlp_norm_name, w.mlp_norm)):
            _write_layernorm(getattr(block, name), new)
        for name in (self.attn_scale_name, self.mlp_scale_name):
            if name is not None:  # the scale now lives in o / down
                getattr(block, name).lambda1.fill_(1.0)
        a, m = block.attention, block.mlp
        a.q_proj, a.k_proj, a.v_proj, a.o_proj = linear(w.q), linear(w.k), linear(w.v), linear(w.o)
        m.fc1, m.fc2 = linear(w.up), linear(w.down)

    def _sub_names(self, sub: Sub) -> list[str]:
        names = (
            ["attention", self.attn_scale_name, self.attn_norm_name] if sub == "attn" else ["mlp", self.mlp_scale_name, self.mlp_norm_name]
        )
        return [n for n in names if n is not None]

    def sub_modules(self, block: nn.Module, sub: Sub) -> list[nn.Module]:
        return [getattr(block, n) for n in self._sub_names(sub)]

    def transplant_mlp(self, dst: nn.Module, src: nn.Module) -> None:
        for name in self._sub_names("mlp"):
            setattr(dst, name, copy.deepcopy(getattr(src, name)))


def _write_layernorm(norm: nn.LayerNorm, new: Norm) -> None:
    """Copy scale and shift into a LayerNorm; a shift into a bias-free LayerNorm must be zero."""
    norm.weight.copy_(new.scale)
    if norm.bias is not None:
        norm.bias.copy_(torch.zeros_like(norm.bias) if new.shift is None else new.shift)
    elif new.shift is not None and new.shift.abs().max() > 0:
        raise ValueError("a LayerNorm without bias cannot hold a nonzero shift")
