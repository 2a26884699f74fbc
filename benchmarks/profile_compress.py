"""Where compression time goes: flatten_gpt's phases in units of one dense forward over the calibration windows.

Wraps the loop's phases (similarity passes, reaching block inputs, sequential targets, the attention and MLP
fits, candidate trials) with timers, compresses SmolLM2 (or ``--model``) once and prints each phase's seconds
and forward-equivalents, then the held-out perplexity (4 x 2048 WikiText tokens after the first 65,536, as
``ablate.py``). Settings are ``CompressConfig`` fields, e.g. ``fast=true input_stride=1``.

    .venv/bin/python benchmarks/profile_compress.py --calib-samples 16 fast=true input_stride=1
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from collections.abc import Callable

import torch
from ablate import EVAL_START, TEXTS

import flatten_lightning.calibrate as calibrate
import flatten_lightning.compress as compress
import flatten_lightning.prune as prune
from flatten_lightning.cli import target_depth
from flatten_lightning.data import calibration_windows, read_text, tokenize
from flatten_lightning.perplexity import perplexity
from flatten_lightning.sources import load_model

SECONDS: collections.Counter = collections.Counter()
CALLS: collections.Counter = collections.Counter()


def timed(name: str, fn: Callable) -> Callable:
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SECONDS[name] += time.perf_counter() - t0
            CALLS[name] += 1

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("settings", nargs="*", help="CompressConfig fields as key=value (JSON values)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    args = ap.parse_args()
    settings = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.settings)}
    for name in (
        "io_similarities",
        "sequential_targets",
        "prune_attention_stage",
        "prune_mlp_stage",
        "final_error",
        "pair_parallel_error",
    ):
        setattr(compress, name, timed(name, getattr(compress, name)))
    calibrate.InputCache.input_of = timed("input_of", calibrate.InputCache.input_of)
    for name in ("gcv_ridge", "select_channels", "head_leverage", "ridge_solve"):  # inside the two fit stages above
        setattr(prune, name, timed(f"  {name}", getattr(prune, name)))
    model, tok = load_model(args.model)
    ids = tokenize(tok, read_text(TEXTS["wikitext"]))
    calib = calibration_windows(ids, args.calib_samples, args.calib_seqlen)
    with torch.no_grad():
        t0 = time.perf_counter()
        for batch in calib.split(4):
            model(input_ids=batch, use_cache=False)
        forward = time.perf_counter() - t0
    cfg = compress.CompressConfig(target_depth(model.config.num_hidden_layers, None, args.ratio), **settings)
    t0 = time.perf_counter()
    plan = compress.flatten_gpt(model, calib, cfg, progress=False)
    total = time.perf_counter() - t0
    print(f"one calibration forward {forward:.1f}s; compression {total:.1f}s = {total / forward:.2f} forwards")
    for name, s in SECONDS.most_common():
        print(f"  {name:24s} {s:7.1f}s {s / forward:5.2f} forwards  ({CALLS[name]} calls)")
    print("merged groups:", [g for g in plan.groups if len(g) > 1])
    print(f"held-out ppl {perplexity(model, ids[EVAL_START:], 2048, 4, progress=False).ppl:.3f}")


if __name__ == "__main__":
    main()
