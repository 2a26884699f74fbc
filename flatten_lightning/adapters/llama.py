"""Llama family (Llama 1/2/3, SmolLM2): RMSNorm, SwiGLU MLP, rotary (grouped-query) attention.

Module layout, shared by the Mistral and Qwen2 adapters that subclass this one:
``model.model.layers[i]`` with ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``; ``model.model.rotary_emb`` gives cos/sin.
Stock LlamaAttention infers the head count from the weight shapes (``view(..., -1, head_dim)``) and
keeps the GQA group size, so a block with 2H heads and 2K KV heads runs in a stock module.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from flatten_lightning.adapters.base import BlockWeights, HeadLayout, ModelAdapter, Norm, Sub, affine_of, linear


class LlamaAdapter(ModelAdapter):
    model_types = ("llama",)
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    # ---------------------------------------------------------------------------------- checks
    def check(self) -> None:
        cfg = self.config
        if getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None):
            self.fail("a mixture-of-experts MLP (MoE)")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            self.fail(f"hidden_act '{cfg.hidden_act}' (only SwiGLU with silu is handled)")
        if cfg.num_attention_heads % self.layout().n_kv_heads:
            self.fail(f"num_attention_heads={cfg.num_attention_heads} is not a multiple of num_key_value_heads")
        for i, layer in enumerate(self.blocks()):
            for name in ("q_norm", "k_norm"):
                if hasattr(layer.self_attn, name):
                    self.fail(f"layer {i} has per-head {name}, which does not fold into the projections")
            for name in ("post_feedforward_layernorm", "pre_feedforward_layernorm"):
                if hasattr(layer, name):
                    self.fail(f"layer {i} has {name} (post-norm block)")
            for norm_name in ("input_layernorm", "post_attention_layernorm"):
                norm = getattr(layer, norm_name, None)
                if norm is None or "RMSNorm" not in type(norm).__name__ or getattr(norm, "bias", None) is not None:
                    self.fail(f"layer {i}.{norm_name} is not a plain RMSNorm")
            self.check_linears(i, layer)

    def check_linears(self, i: int, layer: nn.Module) -> None:
        for sub, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                mod = getattr(getattr(layer, sub), name, None)
                if not isinstance(mod, nn.Linear):
                    self.fail(f"layer {i}.{sub}.{name} is {type(mod).__name__}, not a dense nn.Linear")

    # ---------------------------------------------------------------------------------- model level
    def blocks(self) -> nn.ModuleList:
        return self.model.model.layers

    def set_blocks(self, blocks: list[nn.Module]) -> None:
        self.model.model.layers = nn.ModuleList(blocks)

    def layout(self) -> HeadLayout:
        cfg = self.config
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return HeadLayout(cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, d)

    def embed_module(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def context(self, h: torch.Tensor) -> dict[str, Any]:
        rotary = self.model.model.rotary_emb.to(h.device)
        pos = torch.arange(h.shape[1], device=h.device)[None, :]
        return {"position_embeddings": rotary(h[:1], position_ids=pos)}

    def run_block(self, block: nn.Module, h: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        # No mask: SDPA applies the causal mask itself for full windows without padding.
        return block(h, position_embeddings=ctx["position_embeddings"], attention_mask=None)

    def install(self, blocks: list[nn.Module], groups: list[list[int]]) -> None:
        cfg = self.config
        types = getattr(cfg, "layer_types", None)
        if types is not None:
            cfg.layer_types = [types[g[0]] for g in groups]
        for i, block in enumerate(blocks):
            block.self_attn.layer_idx = i  # KV-cache slot
            if hasattr(block, "layer_idx"):
                block.layer_idx = i
        self.set_blocks(blocks)
        cfg.num_hidden_layers = len(blocks)

    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    # ---------------------------------------------------------------------------------- block level
    def attention(self, block: nn.Module, h: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        out, _ = block.self_attn(block.input_layernorm(h), position_embeddings=ctx["position_embeddings"], attention_mask=None)
        return out

    def mlp(self, block: nn.Module, u: torch.Tensor) -> torch.Tensor:
        return block.mlp(block.post_attention_layernorm(u))

    def o_module(self, block: nn.Module) -> nn.Linear:
        return block.self_attn.o_proj

    def down_module(self, block: nn.Module) -> nn.Linear:
        return block.mlp.down_proj

    def read(self, block: nn.Module) -> BlockWeights:
        a, m = block.self_attn, block.mlp
        return BlockWeights(
            attn_norm=Norm(block.input_layernorm.weight),
            mlp_norm=Norm(block.post_attention_layernorm.weight),
            q=affine_of(a.q_proj),
            k=affine_of(a.k_proj),
            v=affine_of(a.v_proj),
            o=affine_of(a.o_proj),
            gate=affine_of(m.gate_proj),
            up=affine_of(m.up_proj),
            down=affine_of(m.down_proj),
        )

    @torch.no_grad()
    def write(self, block: nn.Module, w: BlockWeights) -> None:
        self.write_norms(block, w)
        a, m = block.self_attn, block.mlp
        a.q_proj, a.k_proj, a.v_proj, a.o_proj = linear(w.q), linear(w.k), linear(w.v), linear(w.o)
        m.gate_proj, m.up_proj, m.down_proj = linear(w.gate), linear(w.up), linear(w.down)

    def write_norms(self, block: nn.Module, w: BlockWeights) -> None:
        for norm, new in ((block.input_layernorm, w.attn_norm), (block.post_attention_layernorm, w.mlp_norm)):
            if new.shift is not None:
                raise ValueError("an RMSNorm has no shift to hold a LayerNorm bias")
            norm.weight.copy_(new.scale)

    def sub_modules(self, block: nn.Module, sub: Sub) -> list[nn.Module]:
        return [block.self_attn, block.input_layernorm] if sub == "attn" else [block.mlp, block.post_attention_layernorm]

    def transplant_mlp(self, dst: nn.Module, src: nn.Module) -> None:
        dst.mlp = copy.deepcopy(src.mlp)
        dst.post_attention_layernorm = copy.deepcopy(src.post_attention_layernorm)
