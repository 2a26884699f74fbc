"""Perplexity by the field's protocol (WikiText-2 as in GPTQ / SparseGPT / SliceGPT / ShortGPT).

The text is tokenized once as a whole (HF ``wikitext`` rows joined with "\\n\\n"; a local file read
whole), cut into non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is
dropped), and perplexity is exp(mean NLL over every predicted token): each window predicts its
tokens 1..seqlen-1 from the ones before, so ``n_windows * (seqlen - 1)`` tokens are scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    n_windows: int
    n_tokens: int  # predicted tokens: n_windows * (seqlen - 1)
    seqlen: int


def windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a 1-D token tensor into ``[n, seqlen]`` non-overlapping windows (tail dropped)."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 to predict anything, got {seqlen}")
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(
            f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}. Fix: use a longer text or a smaller --seqlen."
        )
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on the 1-D token tensor ``ids`` over non-overlapping windows."""
    batches = windows(ids, seqlen, max_windows)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(batches), batch_size), desc="perplexity", disable=not progress):
        x = batches[start : start + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += x[:, 1:].numel()
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, len(batches), total_tokens, seqlen)
