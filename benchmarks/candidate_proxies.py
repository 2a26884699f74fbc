"""Which cheap score ranks candidate pairs as the default's trials do? (what ``--fast`` could compare them by)

The default fits every candidate pair of a step and keeps the one whose model ends nearest the dense
model's last hidden state (``compress.final_error``, which runs the whole tail). ``--fast`` cannot afford
that, so it ranks the candidates by a score computed before any fit. This script runs the default once
and, for every candidate it tries, records such scores on the first quarter of the calibration windows
(``calibrate.error_rows``) next to the final error; then, per score, how often its choice is the trials'
and the summed regret (final error of its choice over the best one's, minus 1). Scores, with h0 the pair's
input, h1 = B_0(h0), h2 = B_1(h1) its output, p = h1 + B_1(h0) - h0 the two blocks run side by side,
d the dense model's hidden state after the group and y the fitted block's output on h0:

    parallel        sum ||h2 - p||^2 / sum ||h2||^2     (calibrate.parallel_error: what --fast uses)
    parallel/token  mean_t ||h2_t - p_t||^2 / ||h2_t||^2
    parallel cos    1 - mean_t cos(h2_t, p_t)
    similarity      1 - mean_t cos(h0_t, h1_t)            (the paper's choice, on these windows)
    update          sum ||h2 - h0||^2 / sum ||h0||^2
    fitted          sum ||y - d||^2 / sum ||d||^2        (needs the fit: not a fast-mode score)
    fitted cos      1 - mean_t cos(y_t, d_t)

    .venv/bin/python benchmarks/candidate_proxies.py --model smollm2 --calib-samples 32 --out runs/proxies-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from ablate import TEXTS

import flatten_lightning.compress as compress
from flatten_lightning.atomic import write_text_atomic
from flatten_lightning.calibrate import error_rows, parallel_error, token_cosine_sum
from flatten_lightning.cli import target_depth
from flatten_lightning.data import calibration_windows, read_text, tokenize
from flatten_lightning.sources import load_model


def sq_ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum ||a - b||^2 / sum ||b||^2 over every token of a, b [n, T, D]."""
    return float((a.double() - b.double()).square().sum() / b.double().square().sum())


def cos_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """1 - mean over tokens of cos(a_t, b_t)."""
    return 1.0 - float(token_cosine_sum(a, b)) / (a.numel() // a.shape[-1])


def instrument(records: list[dict]) -> None:
    """Wrap compress's flatten_blocks / fit_block / final_error so every candidate appends its scores to ``records``."""
    pair: list = []
    flatten_blocks, fit_block, final_error = compress.flatten_blocks, compress.fit_block, compress.final_error

    def flatten_seen(adapter, blocks):
        pair[:] = list(blocks)
        return flatten_blocks(adapter, blocks)

    def fit_scored(runner, new, originals, h, layout, cfg, reduce=compress.no_reduce, dense_out=None, parts=None):
        h0 = h[: error_rows(len(h))]
        h1 = runner.run_block(pair[0], h0, "first block")
        h2 = runner.run_block(pair[1], h1, "second block")
        side = h1 + runner.run_block(pair[1], h0, "second block on the first's input") - h0
        per_token = ((h2.double() - side.double()).square().sum(-1) / h2.double().square().sum(-1)).mean()
        rec = {
            "size": len(originals),
            "parallel": parallel_error(runner, pair[1], h0, h1, h2),  # runs B_1 on h0 again: the exact e --fast ranks by
            "parallel/token": float(per_token),
            "parallel cos": cos_error(side, h2),
            "similarity": cos_error(h0, h1),
            "update": sq_ratio(h2, h0),
        }
        result = fit_block(runner, new, originals, h, layout, cfg, reduce, dense_out, parts)
        y, d = runner.run_block(new, h0, "fitted block"), dense_out[: len(h0)]
        records.append(rec | {"fitted": sq_ratio(y, d), "fitted cos": cos_error(y, d)})
        return result

    def final_recorded(*args, **kwargs):
        records[-1]["final"] = final_error(*args, **kwargs)
        return records[-1]["final"]

    compress.flatten_blocks, compress.fit_block, compress.final_error = flatten_seen, fit_scored, final_recorded


def agreement(records: list[dict], tried: list[int]) -> dict[str, tuple[int, float]]:
    """Per score: (steps where its lowest candidate is the trials' choice, summed regret in final error).

    ``tried``: candidates per step, in order (a late step may have fewer admissible pairs).
    """
    bounds = [sum(tried[:s]) for s in range(len(tried) + 1)]
    steps = [records[a:b] for a, b in zip(bounds, bounds[1:])]
    scores = [k for k in records[0] if k not in ("size", "final")]
    out: dict[str, tuple[int, float]] = {}
    for k in scores:
        hits, regret = 0, 0.0
        for rs in steps:
            best, chosen = min(rs, key=lambda r: r["final"]), min(rs, key=lambda r, k=k: r[k])
            hits += chosen is best
            regret += chosen["final"] / best["final"] - 1.0
        out[k] = (hits, regret)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--out", required=True, help="JSON of every candidate's scores and the agreement table")
    args = ap.parse_args()
    records: list[dict] = []
    instrument(records)
    model, tok = load_model(args.model)
    calib = calibration_windows(tokenize(tok, read_text(TEXTS["wikitext"])), args.calib_samples, args.calib_seqlen)
    cfg = compress.CompressConfig(target_depth(model.config.num_hidden_layers, None, args.ratio))
    if cfg.candidates < 2 or cfg.fast:
        raise SystemExit("the default must try several candidates per step for this comparison")
    t0 = time.perf_counter()
    plan = compress.flatten_gpt(model, calib, cfg, progress=False)
    table = agreement(records, [len(s.candidates) for s in plan.steps])
    result = {"setup": vars(args), "seconds": time.perf_counter() - t0, "groups": plan.groups, "records": records, "agreement": table}
    write_text_atomic(args.out, json.dumps(result, indent=1))
    print(f"{args.model}: {len(plan.steps)} steps, {len(records)} candidates; merged {plan.groups}")
    print("| score | picks the trials' pair | summed regret |\n|---|---|---|")
    for k, (hits, regret) in table.items():
        print(f"| {k} | {hits} / {len(plan.steps)} | {regret:.2f} |")


if __name__ == "__main__":
    main()
