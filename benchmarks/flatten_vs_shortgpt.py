"""SmolLM2 30 -> 24: FlattenGPT (ours and the paper's recipe) vs ShortGPT, all measured in one run.

Each compression runs in its own process (the compression command), so its peak RSS is its own;
a reference process loads the dense model and runs one forward over the calibration windows, giving
the RSS of running the model and the time of one calibration forward pass. Perplexity is on held-out
WikiText-2 validation windows that start after the calibration tokens. Throughput ratios interleave
dense and compressed forwards and take medians, since this machine is noisy.

    .venv/bin/python benchmarks/flatten_vs_shortgpt.py [--eval-windows 16] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from flatten_lightning.atomic import write_text_atomic
from flatten_lightning.data import held_out, read_text, tokenize
from flatten_lightning.export import count_parameters
from flatten_lightning.perplexity import perplexity
from flatten_lightning.sources import load_model, resolve_source

HERE = os.path.dirname(os.path.abspath(__file__))
WIKITEXT = os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2", "valid.txt")

REFERENCE = r"""
import json, sys, time, torch
from flatten_lightning.cli import peak_rss_mb
from flatten_lightning.data import calibration_windows, read_text, tokenize
from flatten_lightning.sources import load_model
m, tok = load_model(sys.argv[1])
calib = calibration_windows(tokenize(tok, read_text(sys.argv[2])), int(sys.argv[3]), int(sys.argv[4]))
with torch.no_grad():
    t = time.perf_counter()
    for b in calib.split(4):
        m(input_ids=b, use_cache=False)
    dt = time.perf_counter() - t
print(json.dumps({"forward_s": dt, "peak_rss_mb": peak_rss_mb()}))
"""


def throughput_ratio(dense, compressed, ids: torch.Tensor, repeats: int = 7) -> float:
    """Median over interleaved repeats of (compressed tokens/s) / (dense tokens/s) on one batch."""
    ratios = []
    with torch.no_grad():
        for m in (dense, compressed):  # warm-up
            m(input_ids=ids, use_cache=False)
        for _ in range(repeats):
            times = []
            for m in (dense, compressed):
                t = time.perf_counter()
                m(input_ids=ids, use_cache=False)
                times.append(time.perf_counter() - t)
            ratios.append(times[0] / times[1])
    return statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target-layers", type=int, default=24)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16, help="held-out windows of 2048 tokens")
    ap.add_argument("--methods", default="flatten,flatten-paper,shortgpt")
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    source = resolve_source("smollm2")
    calib = [WIKITEXT, str(args.calib_samples), str(args.calib_seqlen)]
    ref = json.loads(
        subprocess.run([sys.executable, "-c", REFERENCE, source, *calib], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )

    dense, tok = load_model(source)
    ids = tokenize(tok, read_text(WIKITEXT))
    evaluation = held_out(ids, args.calib_samples, args.calib_seqlen)
    speed_batch = evaluation[: 4 * 512].view(4, 512)
    rows = [
        {
            "method": "dense",
            "layers": dense.config.num_hidden_layers,
            "params": count_parameters(dense),
            "ppl": perplexity(dense, evaluation, 2048, args.eval_windows, progress=False).ppl,
            "seconds": 0.0,
            "x_forward": 0.0,
            "peak_rss_mb": ref["peak_rss_mb"],
            "speedup": 1.0,
        }
    ]
    for method in args.methods.split(","):
        out = os.path.join(args.out, method)
        cmd = [
            sys.executable,
            "-m",
            "flatten_lightning.cli",
            "--model",
            source,
            "--target-layers",
            str(args.target_layers),
            "--calib-file",
            WIKITEXT,
            "--calib-samples",
            str(args.calib_samples),
            "--calib-seqlen",
            str(args.calib_seqlen),
            "--method",
            method,
            "--out",
            out,
            "--overwrite",
            "--quiet",
        ]
        subprocess.run(cmd, check=True)
        with open(os.path.join(out, "compression_report.json")) as f:
            report = json.load(f)
        model, _ = load_model(out)
        rows.append(
            {
                "method": method,
                "layers": model.config.num_hidden_layers,
                "params": count_parameters(model),
                "ppl": perplexity(model, evaluation, 2048, args.eval_windows, progress=False).ppl,
                "seconds": report["timings_s"]["compress"],
                "x_forward": report["timings_s"]["compress"] / ref["forward_s"],
                "peak_rss_mb": report["peak_rss_mb"],
                "speedup": throughput_ratio(dense, model, speed_batch),
            }
        )
        del model
    print(
        f"\nSmolLM2-135M {rows[0]['layers']} -> {args.target_layers} layers; calibration {args.calib_samples} x {args.calib_seqlen} "
        f"WikiText-2 valid tokens; perplexity on the next {args.eval_windows} x 2048 tokens; one calibration forward "
        f"{ref['forward_s']:.1f}s; dense peak RSS {ref['peak_rss_mb']:.0f} MiB\n"
    )
    print("| method | layers | params (M) | held-out ppl | compress s | / forward | peak RSS MiB | RSS / dense | tokens/s vs dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['layers']} | {r['params'] / 1e6:.1f} | {r['ppl']:.2f} | {r['seconds']:.1f} | {r['x_forward']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f} | {r['speedup']:.3f} |"
        )
    write_text_atomic(os.path.join(args.out, "results.json"), json.dumps({"reference": ref, "rows": rows, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
