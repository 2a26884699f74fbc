"""Feature distillation without labels: the compressed backbone (student) learns to reproduce the dense
backbone's (teacher's) final hidden states on unlabeled images.

For student tokens S and teacher tokens T [B, T, D] (``last_hidden_state``: after the encoder's last
LayerNorm, CLS and patch tokens alike):
  mse:     mean over B, T, D of (S - T)^2
  cosine:  mean over B, T of 1 - cos(S_t, T_t)      (scale-free; what the agreement metrics measure)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn.functional import cosine_similarity, mse_loss

DistillLoss = Literal["cosine", "mse"]
DISTILL_LOSSES: tuple[str, ...] = ("cosine", "mse")


def feature_distillation(student: torch.Tensor, teacher: torch.Tensor, kind: DistillLoss = "cosine") -> torch.Tensor:
    """The distillation loss (a scalar, differentiable in ``student``) of tokens [B, T, D], in float32 or wider."""
    if student.shape != teacher.shape:
        raise ValueError(f"student tokens {tuple(student.shape)} and teacher tokens {tuple(teacher.shape)} differ in shape")
    dtype = torch.promote_types(student.dtype, torch.float32)  # half-precision features are compared in float32
    s, t = student.to(dtype), teacher.to(dtype)
    if kind == "mse":
        return mse_loss(s, t)
    if kind == "cosine":
        return 1.0 - cosine_similarity(s, t, dim=-1).mean()
    raise ValueError(f"unknown distillation loss {kind!r}; choose one of {', '.join(DISTILL_LOSSES)}")
