"""Where in a 2048-token window does a compressed model lose to dense? Its perplexity ratio by token position.

Scores each model on the same held-out WikiText-2 windows (``--start`` as in ``heldout_spread.py``), keeps the
NLL of every predicted position averaged over the windows, and prints exp(mean NLL - mean dense NLL) over each
run of ``--bucket`` positions. A ratio that grows with position is lost long-context use, which no choice of
short held-out windows shows.

    .venv/bin/python benchmarks/position_profile.py smollm2 runs/default --windows 16 --start article
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
from heldout_spread import score_on_held_out

from flatten_lightning.atomic import write_text_atomic
from flatten_lightning.data import HELD_OUT_STARTS
from flatten_lightning.perplexity import windows


@torch.no_grad()
def position_nlls(model, ids: torch.Tensor, seqlen: int, n: int) -> torch.Tensor:
    """NLL of the token at each position 1..seqlen-1, averaged over the first ``n`` windows of ``ids`` (1-D): [seqlen - 1]."""
    total = torch.zeros(seqlen - 1, dtype=torch.float64)
    batches = windows(ids, seqlen, n)
    for x in batches:
        logits = model(input_ids=x[None], use_cache=False).logits[0, :-1].double()
        total += torch.nn.functional.cross_entropy(logits, x[1:], reduction="none")
    return total / len(batches)


def bucket_ratios(nll: torch.Tensor, ref: torch.Tensor, bucket: int) -> list[float]:
    """exp(mean NLL - mean reference NLL) over each run of ``bucket`` predicted positions (the last run may be shorter)."""
    return [math.exp((nll[s : s + bucket].mean() - ref[s : s + bucket].mean()).item()) for s in range(0, len(nll), bucket)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model sources; the first is the reference (dense)")
    ap.add_argument("--windows", type=int, default=16, help="held-out windows of --seqlen tokens")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--bucket", type=int, default=128, help="predicted positions per printed ratio")
    ap.add_argument("--calib-tokens", type=int, default=32 * 512, help="WikiText tokens used for calibration (skipped)")
    ap.add_argument("--start", choices=HELD_OUT_STARTS, default="article", help="as heldout_spread.py's --start")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="JSON file for the per-position NLLs (written atomically)")
    args = ap.parse_args()
    if args.out and os.path.exists(args.out):
        raise SystemExit(f"error: {args.out} exists and this script does not overwrite what it did not write. Fix: pass another --out.")
    if args.threads:
        torch.set_num_threads(args.threads)
    nlls = score_on_held_out(args, lambda model, ids: position_nlls(model, ids, args.seqlen, args.windows))
    ref = nlls[args.models[0]]
    starts = range(0, args.seqlen - 1, args.bucket)
    print("| model | " + " | ".join(f"{s + 1}-{min(s + args.bucket, args.seqlen - 1)}" for s in starts) + " |")
    print("|---" * (len(starts) + 1) + "|")
    for source, nll in nlls.items():
        print(f"| {source} | " + " | ".join(f"{r:.2f}" for r in bucket_ratios(nll, ref, args.bucket)) + " |")
    if args.out:
        write_text_atomic(args.out, json.dumps({"setup": vars(args), "nll": {k: v.tolist() for k, v in nlls.items()}}))


if __name__ == "__main__":
    main()
