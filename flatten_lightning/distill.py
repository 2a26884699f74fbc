"""Distillation from the dense model for the recovery of a compressed language model.

Two signals, for a batch of token windows [B, T]:

* logits (``logit_distillation``): with temperature tau, per predicted token,
      KD = tau^2 KL(softmax(z_teacher / tau) || softmax(z_student / tau))
* hidden states of the merged blocks (``hidden_distillation``): block i of the compressed model
  holds the original blocks G_i (its group, ``compose_groups``); its output h_i [B, T, D] should be
  the dense model's output after the last block of G_i, t_{g(i)} with g(i) = max G_i. Over the L'
  blocks of the compressed model, with one of two normalisations (``norm``):
      global:  HD = (1 / L') sum_i  mean_{B,T,D}((h_i - t_{g(i)})^2) / mean_{B,T,D}(t_{g(i)}^2)
      token:   HD = (1 / L') sum_i  mean_{B,T}( ||h_i - t_{g(i)}||^2 / ||t_{g(i)}||^2 )     (norms over D)
  Either way each term is a relative error (0 = exact, 1 = as far off as predicting zeros), so the
  weight of HD means the same on every model and at every depth. They differ where a few tokens
  carry most of the hidden state's energy: Llama-family models put "massive activations" on the
  first token of a window (on SmolLM2-135M, 90-99% of mean(t^2) at blocks 10-21), so ``global``
  measures little but that token there; ``token`` weighs every token's relative error equally.

Block outputs are the residual stream *before* the final norm, for the last block too: they are taken
by forward hooks on the decoder blocks (``block_outputs``), not from ``output_hidden_states``, whose
last entry transformers replaces by the normed ``last_hidden_state`` (``tie_last_hidden_states`` in
``transformers.utils.output_capturing``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from flatten_lightning.compress import Plan


def compose_groups(plans: Sequence[Plan], layers: int) -> list[list[int]]:
    """For each block of the model after every stage of ``plans``, the original blocks it holds.

    ``layers``: blocks of the model before the first stage. Stage k's ``Plan.groups`` index the blocks
    left by stage k-1, so they are mapped through the groups so far: the result indexes the original
    model. Without plans, every block holds itself.
    """
    groups = [[i] for i in range(layers)]
    for k, plan in enumerate(plans):
        if plan.original_layers != len(groups):
            raise ValueError(
                f"compression stage {k + 1} was planned on {plan.original_layers} blocks, but the stages before it leave {len(groups)}"
            )
        groups = [[o for j in g for o in groups[j]] for g in plan.groups]
    return groups


def teacher_blocks(groups: Sequence[Sequence[int]]) -> list[int]:
    """g(i): the original block whose output block i of the compressed model stands for (the last of its group)."""
    return [g[-1] for g in groups]


def logit_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau^2 KL(teacher || student) per predicted token, for logits [..., V] (mean over the tokens)."""
    v = student.shape[-1]
    s = F.log_softmax(student.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher.float().reshape(-1, v) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature * temperature


HIDDEN_NORMS: tuple[str, ...] = ("global", "token")


def hidden_distillation(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], norm: str = "global") -> torch.Tensor:
    """HD over blocks i of hidden states [B, T, D] (float32 or wider): the mean over i of the relative squared error
    of h_i to t_i, relative to t_i's mean square (``global``) or to each token's squared norm (``token``)."""
    if norm not in HIDDEN_NORMS:
        raise ValueError(f"unknown hidden-state normalisation {norm!r}; choose one of {', '.join(HIDDEN_NORMS)}")
    if len(student) != len(teacher) or not student:
        raise ValueError(f"hidden distillation needs one teacher state per student block, got {len(student)} and {len(teacher)}")
    terms = []
    for i, (h, t) in enumerate(zip(student, teacher)):
        if h.shape != t.shape:
            raise ValueError(f"block {i}: student hidden state {tuple(h.shape)} and teacher's {tuple(t.shape)} differ in shape")
        dtype = torch.promote_types(h.dtype, torch.float32)  # half-precision states are compared in float32
        h, t = h.to(dtype), t.to(dtype)
        tiny = torch.finfo(dtype).tiny
        if norm == "global":
            terms.append(F.mse_loss(h, t) / t.square().mean().clamp_min(tiny))
        else:
            terms.append(((h - t).square().sum(-1) / t.square().sum(-1).clamp_min(tiny)).mean())
    return torch.stack(terms).mean()


@contextmanager
def block_outputs(blocks: Sequence[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Record each block's output hidden state [B, T, D] while the context is open (forward hooks).

    Yields a list with one entry per block, filled by the forward passes run inside the context (the
    last pass wins); a decoder layer that returns a tuple contributes its first element.
    """
    outputs: list[torch.Tensor | None] = [None] * len(blocks)

    def hook(i: int):
        def record(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
            outputs[i] = output[0] if isinstance(output, tuple) else output

        return record

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()
