"""Exact flattening of adjacent pre-norm blocks into one wider block (docs/DESIGN.md section 1.2).

A group of blocks l = a, b, ... becomes one block that runs them in parallel on the shared input:
    u = h + sum_l Attn_l(N_l(h)),   out = u + sum_l MLP_l(N'_l(u)).
Each norm's scale g_l (and LayerNorm shift b_l) is folded into the projections it feeds (HF Linear
weight is [out, in]): W <- W diag(g), c <- c + W b; the shared norms then have unit scale and no
shift. Query/key/value rows and gate/up rows concatenate, o and down columns concatenate, output
biases add. With GQA each block contributes whole KV groups, so query head i still uses KV head
i // n_rep. All of it is on ``BlockWeights`` (family-neutral); the adapter reads and writes modules.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from flatten_lightning.adapters import Affine, BlockWeights, ModelAdapter, Norm


def fold_norm(p: Affine, norm: Norm) -> Affine:
    """The projection of the normalised input: W diag(g) and c + W b (computed in float64)."""
    w = p.weight.double()
    weight = (w * norm.scale.double()[None, :]).to(p.weight.dtype)
    bias = p.bias
    if norm.shift is not None:
        shifted = w @ norm.shift.double() + (0.0 if p.bias is None else p.bias.double())
        bias = shifted.to(p.weight.dtype)
    return Affine(weight, bias)


def unit_norm(like: Norm) -> Norm:
    """A norm with nothing left to fold: g = 1 (and b = 0 for a LayerNorm)."""
    return Norm(torch.ones_like(like.scale), None if like.shift is None else torch.zeros_like(like.shift))


def cat_rows(parts: Sequence[Affine]) -> Affine:
    """Input-side projections (q/k/v, gate/up) of parallel blocks: stack rows and biases."""
    biases = [p.bias for p in parts]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        biases = [torch.zeros(p.weight.shape[0], dtype=p.weight.dtype, device=p.weight.device) if p.bias is None else p.bias for p in parts]
    return Affine(torch.cat([p.weight for p in parts], dim=0), None if biases[0] is None else torch.cat(biases))


def cat_cols(parts: Sequence[Affine]) -> Affine:
    """Output-side projections (o/down) of parallel blocks: stack columns, add biases (each block adds its own)."""
    present = [p.bias.double() for p in parts if p.bias is not None]
    bias = sum(present).to(parts[0].weight.dtype) if present else None
    return Affine(torch.cat([p.weight for p in parts], dim=1), bias)


def flatten_weights(ws: Sequence[BlockWeights]) -> BlockWeights:
    """The weights of the parallel block: norms folded, rows/columns concatenated (exact)."""
    if len(ws) < 2:
        raise ValueError(f"flattening needs at least two blocks, got {len(ws)}")
    gated = ws[0].gate is not None

    def rows(name: str, norm: str) -> Affine:
        return cat_rows([fold_norm(getattr(w, name), getattr(w, norm)) for w in ws])

    return BlockWeights(
        attn_norm=unit_norm(ws[0].attn_norm),
        mlp_norm=unit_norm(ws[0].mlp_norm),
        q=rows("q", "attn_norm"),
        k=rows("k", "attn_norm"),
        v=rows("v", "attn_norm"),
        o=cat_cols([w.o for w in ws]),
        gate=rows("gate", "mlp_norm") if gated else None,
        up=rows("up", "mlp_norm"),
        down=cat_cols([w.down for w in ws]),
    )


@torch.no_grad()
def flatten_blocks(adapter: ModelAdapter, blocks: Sequence[nn.Module]) -> nn.Module:
    """One block computing ``blocks`` in parallel on the shared input (exact).

    For n blocks of H heads (K KV heads) and I channels the result has nH heads, nK KV heads and
    nI channels and is an instance of the same class. The input blocks are not modified.
    """
    flat = flatten_weights([adapter.read(b) for b in blocks])
    out = copy.deepcopy(blocks[0])
    adapter.write(out, flat)
    return out
