"""Ablations of our compression recipe: one change at a time against the defaults, same data, one run.

Every variant compresses a fresh copy of the dense model to the same depth and is scored on the same
held-out WikiText-2 windows: those after the first ``EVAL_START`` tokens of the validation text, so
calibration windows (at most ``EVAL_START`` tokens of WikiText) never overlap them whatever the size.
A variant is a set of ``CompressConfig`` fields plus, optionally, the calibration source and size:

    wikitext  the first N x T WikiText-2 validation tokens (the default)
    c4        the first N x T tokens of the C4 sample (a user's calibration text is rarely the test text)
    alpaca    the first N x T tokens of the Alpaca sample (instructions and answers)
    mix       half the windows from WikiText, half from C4, interleaved
    mix3      a third from each of WikiText, C4 and Alpaca, interleaved

With ``--zeroshot`` every variant is also scored on every item of the five zero-shot dev slices (PIQA,
WinoGrande, HellaSwag, ARC-e, ARC-c; lm-eval, acc_norm where the task has it).

Results (JSON, written after every variant) and a markdown table go to ``--out``/<model>/. A variant
already in the JSON with the same resolved CompressConfig is not run again, so an interrupted run continues.

    .venv/bin/python benchmarks/ablate.py --model smollm2 --variants default,ridge-floor-0.1,feedback-1 [--extra 'best=ridge_floor:0.1,feedback:1']
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict
from typing import Any

import torch

from flatten_lightning.atomic import write_text_atomic
from flatten_lightning.cli import target_depth
from flatten_lightning.compress import CompressConfig, flatten_gpt
from flatten_lightning.data import calibration_shares, interleaved_windows, read_text, tokenize
from flatten_lightning.perplexity import perplexity
from flatten_lightning.sources import load_model
from flatten_lightning.zeroshot import PAPER_TASKS, evaluate_zeroshot

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data")
TEXTS = {
    "wikitext": os.path.join(DATA, "wikitext-2", "valid.txt"),
    "c4": os.path.join(DATA, "c4", "c4_demo.jsonl"),
    "alpaca": os.path.join(DATA, "alpaca", "alpaca_en_demo.json"),
}
MIXES = {"mix": ["wikitext", "c4"], "mix3": ["wikitext", "c4", "alpaca"]}  # windows in turn (data.interleaved_windows)
EVAL_START = 128 * 512  # held-out WikiText starts here: room for the largest calibration set below
ZEROSHOT_DIR = os.path.join(DATA, "zeroshot-dev")

# name -> settings: CompressConfig fields, and "calib" (wikitext | c4 | mix) / "calib_samples".
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "ridge-0.1": {"fit_ridge": 0.1},  # the fixed ridge (the default before cross-validation)
    "ridge-floor-0.03": {"fit_ridge": "gcv", "ridge_floor": 0.03},  # the floor acts on GCV only
    "ridge-floor-0.1": {"fit_ridge": "gcv", "ridge_floor": 0.1},
    "ridge-floor-0.3": {"fit_ridge": "gcv", "ridge_floor": 0.3},
    "feedback-0.5": {"feedback": 0.5},
    "feedback-1": {"feedback": 1.0},
    "refit-1": {"refit_passes": 1},
    "head-leverage": {"head_score": "leverage"},
    "candidates-1": {"candidates": 1},
    "trial-holdout-4": {"trial_holdout": 4},
    "channels-leverage": {"channel_score": "leverage"},
    "heads-loss": {"head_score": "loss"},
    "no-input-fit": {"input_fit": False},  # the o/down fits only, parts reading the shared input as flattened
    "calib-16": {"calib_samples": 16},
    "calib-64": {"calib_samples": 64},
    "calib-128": {"calib_samples": 128},
    "calib-c4": {"calib": "c4"},
    "calib-mix": {"calib": "mix"},
    "calib-alpaca": {"calib": "alpaca"},
    "calib-mix3": {"calib": "mix3"},
}
DATA_KEYS = ("calib", "calib_samples")


def parse_extra(spec: str) -> tuple[str, dict[str, Any]]:
    """'name=key:value,key:value' -> (name, settings); values are JSON (numbers, true/false) or strings."""
    name, _, body = spec.partition("=")
    if not name or not body:
        raise ValueError(f"--extra {spec!r}: expected name=key:value[,key:value...]")
    settings = {}
    for item in body.split(","):
        key, _, raw = item.partition(":")
        try:
            settings[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key.strip()] = raw.strip()
    return name, settings


def calibration(tokenizer, source: str, n: int, seqlen: int) -> torch.Tensor:
    """[n, seqlen] calibration windows from ``source`` (a TEXTS name, mix or mix3); wikitext stays before EVAL_START."""
    names = MIXES.get(source, [source])
    if any(t not in TEXTS for t in names):
        raise ValueError(f"calibration source {source!r} is not one of {', '.join([*TEXTS, *MIXES])}")
    if names[0] == "wikitext" and calibration_shares(n, len(names))[0] * seqlen > EVAL_START:
        raise ValueError(f"{n} x {seqlen} calibration tokens would overlap the held-out WikiText (at most {EVAL_START})")
    return interleaved_windows([tokenize(tokenizer, read_text(TEXTS[t])) for t in names], n, seqlen, names)


def table(rows: list[dict[str, Any]], dense_ppl: float) -> str:
    lines = ["| variant | settings | held-out ppl | / dense | vs default | compress s | zero-shot avg |", "|---|---|---|---|---|---|---|"]
    base = next((r["ppl"] for r in rows if r["variant"] == "default"), None)
    for r in rows:
        vs = f"{r['ppl'] / base - 1:+.1%}" if base else "-"
        lines.append(
            f"| {r['variant']} | {json.dumps(r['settings'])} | {r['ppl']:.2f} | {r['ppl'] / dense_ppl:.3f} | {vs} | {r['seconds']:.0f} | "
            + (f"{100 * r['zeroshot']['avg']:.1f} |" if r.get("zeroshot") else "- |")
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="a packaged model name, local directory or hub id")
    ap.add_argument("--ratio", type=float, default=0.2, help="fraction of blocks to remove")
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows unless a variant sets its own")
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out windows of 2048 tokens")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated among {', '.join(VARIANTS)}")
    ap.add_argument("--extra", action="append", default=[], help="another variant: name=key:value,key:value (repeatable)")
    ap.add_argument("--zeroshot", action="store_true", help="also score every item of the five zero-shot dev slices")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/ablate")
    args = ap.parse_args()

    variants = {}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            ap.error(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        variants[name] = VARIANTS[name]
    for spec in args.extra:
        name, settings = parse_extra(spec)
        variants[name] = settings
    for settings in variants.values():  # refuse a bad setting before any model is loaded
        CompressConfig(1, **{k: v for k, v in settings.items() if k not in DATA_KEYS})
    torch.set_num_threads(args.threads)

    dense, tok = load_model(args.model)
    depth = dense.config.num_hidden_layers
    target = target_depth(depth, None, args.ratio)
    evaluation = tokenize(tok, read_text(TEXTS["wikitext"]))[EVAL_START:]
    out_dir = os.path.join(args.out, os.path.basename(os.path.normpath(args.model)))
    path = os.path.join(out_dir, "results.json")
    done: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            done = json.load(f)
    if done and (done.get("target") != target or done.get("eval_windows") != args.eval_windows):
        raise SystemExit(f"error: {path} holds another setup (target {done.get('target')}, eval windows {done.get('eval_windows')})")
    if "dense_ppl" not in done:
        done = {"model": args.model, "target": target, "eval_windows": args.eval_windows, "rows": []}
        done["dense_ppl"] = perplexity(dense, evaluation, 2048, args.eval_windows, progress=False).ppl
    rows: list[dict[str, Any]] = done["rows"]
    for name, settings in variants.items():
        cfg = CompressConfig(target, **{k: v for k, v in settings.items() if k not in DATA_KEYS})
        # The resolved config, not only the variant's settings: a row measured before a default changed is run again.
        if any(r["variant"] == name and r.get("config") == asdict(cfg) and (r.get("zeroshot") or not args.zeroshot) for r in rows):
            continue
        calib = calibration(tok, settings.get("calib", "wikitext"), settings.get("calib_samples", args.calib_samples), args.calib_seqlen)
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        plan = flatten_gpt(model, calib, cfg, progress=False)
        seconds = time.perf_counter() - t0
        ppl = perplexity(model, evaluation, 2048, args.eval_windows, progress=False).ppl
        row = {"variant": name, "settings": settings, "config": asdict(cfg), "ppl": ppl, "seconds": seconds, "groups": plan.groups}
        if args.zeroshot:
            zs = evaluate_zeroshot(model, tok, ZEROSHOT_DIR, PAPER_TASKS)
            row["zeroshot"] = {t: zs[t] for t in PAPER_TASKS} | {"avg": zs["paper_avg"]}
        rows[:] = [r for r in rows if r["variant"] != name] + [row]
        write_text_atomic(path, json.dumps(done, indent=2))
        print(f"{name}: held-out ppl {ppl:.3f} ({ppl / done['dense_ppl']:.3f}x dense {done['dense_ppl']:.3f}), {seconds:.0f}s", flush=True)
        del model
    head = (
        f"{args.model} {depth} -> {target} layers, ours with one change at a time; held-out WikiText-2 ppl on "
        f"{args.eval_windows} x 2048 tokens after the first {EVAL_START}; dense {done['dense_ppl']:.2f}\n\n"
    )
    write_text_atomic(os.path.join(out_dir, "results.md"), head + table(rows, done["dense_ppl"]))
    print(head + table(rows, done["dense_ppl"]))


if __name__ == "__main__":
    main()
