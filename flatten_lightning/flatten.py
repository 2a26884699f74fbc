"""Exact flattening of adjacent pre-norm blocks into one wider block (docs/DESIGN.md section 1.2).

A group of blocks l = a, b, ... becomes one block that runs them in parallel on the shared input:
    u = h + sum_l Attn_l(N_l(h)),   out = u + sum_l MLP_l(N'_l(u)).
Each RMSNorm weight g_l is folded into the columns of the projections it feeds (HF Linear weight is
[out, in], so W <- W diag(g)); the shared norms then have unit weight. Query/key/value rows and
gate/up rows concatenate, o_proj and down_proj columns concatenate, output biases add. With GQA each
block contributes whole KV groups, so query head i still uses KV head i // n_rep.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

_QKV = ("q_proj", "k_proj", "v_proj")
_GATE_UP = ("gate_proj", "up_proj")


def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A trainable ``nn.Linear`` holding exactly ``weight`` [out, in] and ``bias`` [out] (dtype/device kept).

    Surgery runs under no_grad, so the source tensors say nothing about trainability: new modules are
    trainable like any freshly built layer, and recovery (LoRA or full) freezes what it wants.
    """
    out_f, in_f = weight.shape
    mod = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    mod.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        mod.bias = nn.Parameter(bias.detach().clone())
    return mod


def fold_norm(weight: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """W diag(g): the projection applied after a norm with weight ``g`` [in] (computed in float64)."""
    return (weight.double() * g.double()[None, :]).to(weight.dtype)


def _cat_rows(mods: Sequence[nn.Linear], norms: Sequence[torch.Tensor]) -> nn.Linear:
    """Input-side projections (q/k/v, gate/up): fold each norm, stack rows, stack biases."""
    weight = torch.cat([fold_norm(m.weight, g) for m, g in zip(mods, norms)], dim=0)
    bias = None if mods[0].bias is None else torch.cat([m.bias for m in mods], dim=0)
    return linear(weight, bias)


def _cat_cols(mods: Sequence[nn.Linear]) -> nn.Linear:
    """Output-side projections (o/down): stack columns, add biases (each block adds its own)."""
    weight = torch.cat([m.weight for m in mods], dim=1)
    bias = None if mods[0].bias is None else sum(m.bias.double() for m in mods).to(mods[0].bias.dtype)
    return linear(weight, bias)


@torch.no_grad()
def flatten_blocks(blocks: Sequence[nn.Module]) -> nn.Module:
    """One decoder block computing ``blocks`` in parallel on the shared input (exact).

    For n blocks of H heads (K KV heads) and I channels the result has nH heads, nK KV heads and
    nI channels and is an instance of the same class (a stock HF module: head counts are inferred
    from weight shapes). The input blocks are not modified.
    """
    if len(blocks) < 2:
        raise ValueError(f"flattening needs at least two blocks, got {len(blocks)}")
    g_attn = [b.input_layernorm.weight for b in blocks]
    g_mlp = [b.post_attention_layernorm.weight for b in blocks]
    out = copy.deepcopy(blocks[0])
    attn, mlp = out.self_attn, out.mlp
    for name in _QKV:
        setattr(attn, name, _cat_rows([getattr(b.self_attn, name) for b in blocks], g_attn))
    attn.o_proj = _cat_cols([b.self_attn.o_proj for b in blocks])
    for name in _GATE_UP:
        setattr(mlp, name, _cat_rows([getattr(b.mlp, name) for b in blocks], g_mlp))
    mlp.down_proj = _cat_cols([b.mlp.down_proj for b in blocks])
    out.input_layernorm.weight.fill_(1.0)
    out.post_attention_layernorm.weight.fill_(1.0)
    return out
