"""Calibration texts from WikiText-2 articles that no held-out window touches: contiguous, or spread out.

The bench calibrates on the first tokens of WikiText-2 validation and holds out the windows right after
them, so its first held-out windows continue the article the calibration ends in. This script writes two
calibration files from the articles after the held-out windows (from the first article that begins after
``--skip-tokens`` tokens, ``data.first_article_after``), ``--n`` x ``--seqlen`` tokens each:

- ``contiguous.txt``: the tail text itself (the CLI takes its first windows: a few articles);
- ``spread.txt``: ``--n`` windows of ``--seqlen`` tokens evenly spaced over the whole tail, decoded and joined
  (many articles; the CLI cuts the same windows again, as the decoded text re-tokenizes to the same length).

    .venv/bin/python benchmarks/calib_elsewhere.py --out-dir runs/calib-elsewhere
    .venv/bin/python -m flatten_lightning.cli --model smollm2 --ratio 0.2 --calib-file runs/calib-elsewhere/spread.txt \
        --calib-samples 32 --eval-windows 0 --out runs/tail-spread
"""

from __future__ import annotations

import argparse
import os

import torch
from compress_bench import WIKITEXT

from flatten_lightning.atomic import write_text_atomic
from flatten_lightning.data import first_article_after, read_text, tokenize
from flatten_lightning.sources import load_model


def spread_windows(ids: torch.Tensor, n: int, seqlen: int) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens of ``ids`` (1-D), the first at 0, the last ending within ``seqlen`` of the end,
    starts evenly spaced (step (len - seqlen) // (n - 1)): [n, seqlen]."""
    if n < 2 or ids.numel() < n * seqlen:
        raise ValueError(f"need n >= 2 windows of {seqlen} within {ids.numel()} tokens, got n={n}")
    step = (ids.numel() - seqlen) // (n - 1)
    return torch.stack([ids[j * step : j * step + seqlen] for j in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="whose tokenizer counts the tokens")
    ap.add_argument("--skip-tokens", type=int, default=16384 + 32 * 2048, help="calibration + held-out tokens to stay clear of")
    ap.add_argument("--n", type=int, default=32, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--out-dir", required=True, help="new directory for contiguous.txt and spread.txt")
    args = ap.parse_args()
    if os.path.exists(args.out_dir):
        raise SystemExit(
            f"error: {args.out_dir} exists and this script does not overwrite what it did not write. Fix: pass another --out-dir."
        )
    _, tok = load_model(args.model)  # the tokenizer of any source load_model takes; the model is small next to the text
    text = read_text(WIKITEXT)
    tail = text[first_article_after(tok, text, args.skip_tokens) :]
    tail_ids = tokenize(tok, tail)
    windows = spread_windows(tail_ids, args.n, args.seqlen)
    spread = "".join(tok.decode(w) for w in windows)
    got = tokenize(tok, spread).numel()
    if got < args.n * args.seqlen:
        raise SystemExit(
            f"error: the spread windows re-tokenize to {got} tokens, fewer than {args.n} x {args.seqlen}. Fix: another --seqlen."
        )
    os.makedirs(args.out_dir)
    write_text_atomic(os.path.join(args.out_dir, "contiguous.txt"), tail)
    write_text_atomic(os.path.join(args.out_dir, "spread.txt"), spread)
    print(f"tail: {len(tail)} chars, {tail_ids.numel()} tokens; spread: {args.n} windows of {args.seqlen}, {got} tokens")


if __name__ == "__main__":
    main()
