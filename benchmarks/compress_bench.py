"""One model at one depth ratio: FlattenGPT (ours, the paper's recipe) vs ShortGPT and SLEB, in one run.

Each compression runs in its own process (the compression command), so its peak RSS is its own;
a reference process loads the dense model and runs one forward over the calibration windows, giving
the RSS of running the model and the time of one calibration forward pass. Perplexity is on held-out
WikiText-2 validation windows that start after the calibration tokens. Throughput ratios interleave
dense and compressed forwards and take medians, since this machine is noisy.

    .venv/bin/python benchmarks/compress_bench.py --model smollm2 --ratio 0.2 [--eval-windows 8] [--out runs/bench]

Models: ``smollm2`` (SmolLM2-135M, Llama, 30 layers) and ``qwen2.5-coder-0.5b`` (Qwen2, 24 layers), or any
source ``load_model`` takes. SLEB scores candidates on ``--score-windows`` calibration windows (its
cost is ~L^2/2 block runs per removal). The ratio check at the end is the issue's bar: tokens/s of the
compressed model at least 0.95 x original/compressed depth.
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
from flatten_lightning.cli import target_depth
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


def macs_per_token(config, layers: int, context: int) -> float:
    """Multiply-accumulates per token of a forward at ``context`` tokens: ``layers`` blocks plus the LM head.

    Per block: q/o projections 2 D (H d), k/v 2 D (KV d), causal attention scores and values
    2 (H d) (context + 1) / 2 on average, gated MLP 3 D I; the head V D. Norms, rotary and the
    softmax are left out (a few percent).
    """
    d, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    block = 2 * d * q + 2 * d * kv + 2 * q * (context + 1) / 2 + 3 * d * i
    return layers * block + v * d


def run_compression(
    source: str,
    method: str,
    target: int,
    calib_samples: int,
    calib_seqlen: int,
    out: str,
    extra: list[str],
    calib_files: list[str] | None = None,
) -> dict:
    """The compression command in its own process (its peak RSS is its own) into ``out``; returns its report.

    ``calib_files``: the calibration texts (windows in turn; default WikiText alone).
    """
    files = calib_files or [WIKITEXT]
    cmd = [sys.executable, "-m", "flatten_lightning.cli", "--model", source, "--target-layers", str(target), "--calib-file", *files]
    cmd += ["--calib-samples", str(calib_samples), "--calib-seqlen", str(calib_seqlen), "--method", method, *extra]
    subprocess.run([*cmd, "--out", out, "--overwrite", "--quiet"], check=True)
    with open(os.path.join(out, "compression_report.json")) as f:
        return json.load(f)


def add_setup_args(ap: argparse.ArgumentParser) -> None:
    """The flags that fix a comparison's setup: model, depth ratio, calibration and held-out sizes."""
    ap.add_argument("--model", default="smollm2", help="a packaged model name, local directory or hub id")
    ap.add_argument("--ratio", type=float, default=0.2, help="fraction of blocks to remove")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out windows of 2048 tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setup_args(ap)
    ap.add_argument("--methods", default="flatten,flatten-paper,shortgpt,sleb")
    ap.add_argument("--score-windows", type=int, default=4, help="SLEB: calibration windows scored per candidate")
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    source = resolve_source(args.model)
    out_root = os.path.join(args.out, os.path.basename(os.path.normpath(args.model)))
    calib = [WIKITEXT, str(args.calib_samples), str(args.calib_seqlen)]
    ref = json.loads(
        subprocess.run([sys.executable, "-c", REFERENCE, source, *calib], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )

    dense, tok = load_model(source)
    depth = dense.config.num_hidden_layers
    target = target_depth(depth, None, args.ratio)
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
        out = os.path.join(out_root, method)
        extra = ["--score-windows", str(args.score_windows)] if method == "sleb" else []
        report = run_compression(source, method, target, args.calib_samples, args.calib_seqlen, out, extra)
        model, _ = load_model(out)
        rows.append(
            {
                "method": method,
                "layers": model.config.num_hidden_layers,
                "params": count_parameters(model),
                "ppl": perplexity(model, evaluation, 2048, args.eval_windows, progress=False).ppl,
                "seconds": report["timings_s"]["compression"],
                "x_forward": report["timings_s"]["compression"] / ref["forward_s"],
                "peak_rss_mb": report["peak_rss_mb"],
                "speedup": throughput_ratio(dense, model, speed_batch),
            }
        )
        del model
    print(
        f"\n{args.model} {depth} -> {target} layers; calibration {args.calib_samples} x {args.calib_seqlen} "
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
    # The bar is 0.95 x the depth ratio; removing blocks cannot speed up what is not in a block
    # (the LM head), so the speed-up any depth method can reach is the ratio of forward MACs.
    bar = 0.95 * depth / target
    ceiling = macs_per_token(dense.config, depth, speed_batch.shape[1]) / macs_per_token(dense.config, target, speed_batch.shape[1])
    print(
        f"tokens/s bar 0.95 x {depth}/{target} = {bar:.3f}x; the MAC ratio (what removing blocks can give at "
        f"{speed_batch.shape[1]} tokens, LM head included) is {ceiling:.3f}x, so 0.95 x that = {0.95 * ceiling:.3f}x"
    )
    for r in rows[1:]:
        verdict = (
            "meets" if r["speedup"] >= bar else ("BELOW the depth bar, meets 0.95 x MACs" if r["speedup"] >= 0.95 * ceiling else "BELOW")
        )
        print(f"{r['method']}: tokens/s {r['speedup']:.3f}x dense ({verdict})")
    ours, short = {r["method"]: r["ppl"] for r in rows}.get("flatten"), {r["method"]: r["ppl"] for r in rows}.get("shortgpt")
    if ours and short:
        print(f"flatten vs shortgpt held-out ppl: {ours:.2f} vs {short:.2f} ({ours / short - 1:+.1%}; the bar is -25%)")
    write_text_atomic(
        os.path.join(out_root, "results.json"),
        json.dumps({"reference": ref, "rows": rows, "args": vars(args), "mac_ratio": ceiling}, indent=2),
    )


if __name__ == "__main__":
    main()
