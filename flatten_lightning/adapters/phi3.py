"""Phi-3: the Llama block with fused projections.

``self_attn.qkv_proj`` holds the rows [q (H d); k (K d); v (K d)] and ``mlp.gate_up_proj`` the rows
[gate (I); up (I)] (the MLP splits its output in halves, so any width works). ``read`` splits them and
``write`` fuses them again. Phi3Attention takes the query width from ``self.config.num_attention_heads``
(not from the weights), so a block whose head counts differ from the model's gets its own copy of the
config with its counts; a block back at the model's width shares the model's config again.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from flatten_lightning.adapters.base import Affine, BlockWeights, Norm, affine_of, linear
from flatten_lightning.adapters.llama import LlamaAdapter


def split_rows(p: Affine, sizes: list[int]) -> list[Affine]:
    """Row blocks of a fused projection: [sum(sizes), in] -> len(sizes) projections."""
    ws = p.weight.split(sizes, dim=0)
    bs = [None] * len(sizes) if p.bias is None else p.bias.split(sizes, dim=0)
    return [Affine(w, b) for w, b in zip(ws, bs)]


def fuse_rows(parts: list[Affine]) -> Affine:
    """The inverse of ``split_rows``."""
    bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
    return Affine(torch.cat([p.weight for p in parts]), bias)


class Phi3Adapter(LlamaAdapter):
    model_types = ("phi3",)
    lora_targets = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

    def check_linears(self, i: int, layer: nn.Module) -> None:
        for sub, names in (("self_attn", ("qkv_proj", "o_proj")), ("mlp", ("gate_up_proj", "down_proj"))):
            for name in names:
                mod = getattr(getattr(layer, sub), name, None)
                if not isinstance(mod, nn.Linear):
                    self.fail(f"layer {i}.{sub}.{name} is {type(mod).__name__}, not a dense nn.Linear")

    def max_window(self) -> int | None:
        window = getattr(self.config, "sliding_window", None)
        return None if window is None else int(window)

    def read(self, block: nn.Module) -> BlockWeights:
        a, m = block.self_attn, block.mlp
        d = self.layout().head_dim
        n_q = a.config.num_attention_heads * d
        n_kv = (a.qkv_proj.out_features - n_q) // 2
        q, k, v = split_rows(affine_of(a.qkv_proj), [n_q, n_kv, n_kv])
        half = m.gate_up_proj.out_features // 2
        gate, up = split_rows(affine_of(m.gate_up_proj), [half, half])
        return BlockWeights(
            attn_norm=Norm(block.input_layernorm.weight),
            mlp_norm=Norm(block.post_attention_layernorm.weight),
            q=q,
            k=k,
            v=v,
            o=affine_of(a.o_proj),
            gate=gate,
            up=up,
            down=affine_of(m.down_proj),
        )

    @torch.no_grad()
    def write(self, block: nn.Module, w: BlockWeights) -> None:
        self.write_norms(block, w)
        a, m = block.self_attn, block.mlp
        a.qkv_proj, a.o_proj = linear(fuse_rows([w.q, w.k, w.v])), linear(w.o)
        m.gate_up_proj, m.down_proj = linear(fuse_rows([w.gate, w.up])), linear(w.down)
        n_heads, n_kv = self.heads_of(w)
        cfg = self.config
        if (n_heads, n_kv) == (cfg.num_attention_heads, cfg.num_key_value_heads):
            a.config = cfg
        else:
            a.config = copy.copy(cfg)
            a.config.num_attention_heads, a.config.num_key_value_heads = n_heads, n_kv
        a.num_key_value_heads = n_kv
