"""How much does the choice of held-out windows move a compressed model's perplexity ratio to dense?

The bench tables hold out 8 x 2048 WikiText-2 tokens after the calibration tokens. This script scores each
model on ``--windows`` consecutive windows of 2048 from the same start (library protocol: non-overlapping
windows, mean NLL over predicted tokens), then reports the ratio to the first model (dense) over all of them
and over each run of ``--group`` windows: the spread says how far one 16k-token set can be trusted.
``--start article`` starts at the first article after the calibration tokens instead (``data.first_article_after``):
the bench's windows start mid-article, so its first ones continue the article the calibration ends in.

    .venv/bin/python benchmarks/heldout_spread.py smollm2 runs/default runs/quality-long/smollm2/shortgpt --windows 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from typing import TypeVar

import torch
from compress_bench import WIKITEXT

from flatten_lightning.atomic import write_text_atomic
from flatten_lightning.data import HELD_OUT_STARTS, held_out_ids, read_text
from flatten_lightning.perplexity import perplexity, windows
from flatten_lightning.sources import load_model

T = TypeVar("T")


def window_nlls(model, ids: torch.Tensor, seqlen: int, n: int) -> list[float]:
    """Mean NLL per predicted token of each of the first ``n`` windows of ``ids`` (1-D) [n]."""
    return [perplexity(model, w, seqlen, 1, progress=False).nll for w in windows(ids, seqlen, n)]


def group_ratios(nll: list[float], ref: list[float], group: int) -> list[float]:
    """exp(mean NLL - mean reference NLL) over each run of ``group`` windows (every window predicts as many tokens)."""
    starts = range(0, len(nll) - group + 1, group)
    return [math.exp(sum(nll[s : s + group]) / group - sum(ref[s : s + group]) / group) for s in starts]


def score_on_held_out(args: argparse.Namespace, score: Callable[[torch.nn.Module, torch.Tensor], T]) -> dict[str, T]:
    """``score(model, ids)`` of each of ``args.models``, one loaded at a time, on the same held-out WikiText tokens
    ``ids`` (1-D; ``args.calib_tokens`` and ``args.start`` as ``data.held_out_ids``, cut with the first model's
    tokenizer and checked to hold ``args.windows`` windows of ``args.seqlen``)."""
    ids, out = None, {}
    for source in args.models:
        model, tok = load_model(source)  # resolves a packaged name such as smollm2 itself
        if ids is None:
            ids = held_out_ids(tok, read_text(WIKITEXT), args.calib_tokens, args.start)
            if ids.numel() < args.windows * args.seqlen:
                raise SystemExit(f"error: only {ids.numel() // args.seqlen} held-out windows. Fix: pass fewer --windows.")
        out[source] = score(model, ids)
        del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model sources; the first is the reference (dense)")
    ap.add_argument("--windows", type=int, default=32, help="held-out windows of --seqlen tokens")
    ap.add_argument("--group", type=int, default=8, help="windows per set (the bench tables' 8)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib-tokens", type=int, default=32 * 512, help="WikiText tokens used for calibration (skipped)")
    ap.add_argument(
        "--start",
        choices=HELD_OUT_STARTS,
        default="tokens",
        help="held-out windows start right after the calibration tokens (the bench's) or at the next article",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="JSON file for the per-window NLLs (written atomically)")
    args = ap.parse_args()
    if args.out and os.path.exists(args.out):
        raise SystemExit(f"error: {args.out} exists and this script does not overwrite what it did not write. Fix: pass another --out.")
    if args.windows < args.group or args.group < 1:
        raise SystemExit(f"error: --group {args.group} must be in [1, --windows {args.windows}]")
    if args.threads:
        torch.set_num_threads(args.threads)
    nlls = score_on_held_out(args, lambda model, ids: window_nlls(model, ids, args.seqlen, args.windows))
    ref = nlls[args.models[0]]
    print(f"| model | ppl over {args.windows} windows | / first | / first, per {args.group} windows |")
    print("|---|---|---|---|")
    for source, nll in nlls.items():
        whole = math.exp(sum(nll) / len(nll))
        per = ", ".join(f"{r:.3f}" for r in group_ratios(nll, ref, args.group))
        print(f"| {source} | {whole:.2f} | {whole / math.exp(sum(ref) / len(ref)):.3f} | {per} |")
    if args.out:
        write_text_atomic(args.out, json.dumps({"setup": vars(args), "nll": nlls}, indent=2))


if __name__ == "__main__":
    main()
