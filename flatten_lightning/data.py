"""Text sources and token windows for calibration and held-out evaluation.

A text file is read whole (WikiText-2 style); ``.jsonl`` takes each row's "text" and ``.json``
(Alpaca) each row's instruction/input/output, joined with "\\n\\n" as the WikiText protocol joins
rows. Calibration takes the first ``n`` non-overlapping windows; held-out evaluation starts after
them, so the two never share a token.
"""

from __future__ import annotations

import json
import os

import torch
from transformers import PreTrainedTokenizerBase


def read_text(path: str) -> str:
    """The text of a local file (.txt read whole; .jsonl "text" fields; .json Alpaca rows)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path} does not exist. Fix: pass an existing .txt, .jsonl or .json file.")
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return "\n\n".join(r["text"] for r in rows)
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        return "\n\n".join("\n".join(p for p in (r.get("instruction", ""), r.get("input", ""), r.get("output", "")) if p) for r in rows)
    with open(path, encoding="utf-8") as f:
        return f.read()


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of ids, tokenized once."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_windows(ids: torch.Tensor, n: int, seqlen: int, source: str = "the calibration text") -> torch.Tensor:
    """The first ``n`` non-overlapping windows of ``seqlen`` tokens: [n, seqlen]."""
    if n < 1 or seqlen < 2:
        raise ValueError(f"need at least one calibration window of >= 2 tokens, got n={n}, seqlen={seqlen}")
    if ids.numel() < n * seqlen:
        raise ValueError(
            f"{source} has {ids.numel()} tokens, fewer than the {n} x {seqlen} = {n * seqlen} needed for "
            f"the requested calibration windows. Fix: lower --calib-samples or --calib-seqlen, or use a longer text."
        )
    return ids[: n * seqlen].view(n, seqlen).clone()


def held_out(ids: torch.Tensor, n_calib: int, calib_seqlen: int) -> torch.Tensor:
    """The tokens after the calibration windows (for evaluation on unseen text)."""
    return ids[n_calib * calib_seqlen :]
