"""Every depth-compression method on SmolLM2 at several depths, on the same data, in one run.

Calibration: the first ``--calib-samples`` x ``--calib-seqlen`` tokens of WikiText-2 valid (16 x 512).
Evaluation: held-out perplexity on the windows that follow those tokens (``data.held_out``) and
zero-shot accuracy on the dev slice (``zeroshot.evaluate_zeroshot``, first ``--limit`` items per task).
Each method compresses a fresh copy of the dense model once per ratio; all are evaluated in memory
(the exportable ones reload bit-for-bit as plain HF models, see tests/test_baselines.py;
flatten-noprune has wider blocks than any plain config describes). flatten-noprune flattens the
groups our ``flatten`` chose at the same ratio when that ran first, isolating the cost of pruning.

Writes ``results.json`` (after every method, so an interrupted run keeps what it measured),
``results.md``, ``ppl_vs_ratio.png`` and ``similarity.png`` (cos of block inputs of the dense model).

    .venv/bin/python benchmarks/compare.py --ratios 0.2 --eval-windows 4 --limit 40 --out runs/compare
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Any

import torch

from flatten_lightning.atomic import write_text_atomic
from flatten_lightning.calibrate import BlockRunner, similarity_matrix
from flatten_lightning.data import calibration_windows, held_out, read_text, tokenize
from flatten_lightning.evaluate import evaluate_model
from flatten_lightning.methods import METHODS, compress_with
from flatten_lightning.sources import load_model
from flatten_lightning.zeroshot import PAPER_TASKS, headline

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data")
# flatten first: flatten-noprune reuses its groups.
ORDER = ("shortgpt", "sleb", "laco", "blockpruner", "flatten-paper", "flatten", "flatten-noprune")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--wikitext", default=os.path.join(DATA, "wikitext-2", "valid.txt"))
    ap.add_argument("--zeroshot-dir", default=os.path.join(DATA, "zeroshot-dev"))
    ap.add_argument("--ratios", default="0.1,0.2,0.3", help="fractions of blocks removed, comma separated")
    ap.add_argument("--methods", default="all", help=f"comma separated among {', '.join(METHODS)}, or all")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument(
        "--score-windows", type=int, default=0, help="SLEB/BlockPruner: score perplexity on the first N calibration windows (0: all)"
    )
    ap.add_argument("--score-seqlen", type=int, default=0, help="SLEB/BlockPruner: and on their first T tokens (0: whole windows)")
    ap.add_argument(
        "--laco-merge-layers",
        type=int,
        default=2,
        help="LaCo: blocks per merge (paper: 4; on SmolLM2 a merge of 3 or 4 blocks sends calibration perplexity past 1e4)",
    )
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out perplexity windows")
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=100, help="zero-shot items per task (0: skip zero-shot)")
    ap.add_argument("--tasks", default=",".join(PAPER_TASKS))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--heatmap-tokens", type=int, default=4096)
    ap.add_argument("--out", default="runs/compare")
    return ap.parse_args(argv)


def method_kwargs(method: str, args: argparse.Namespace, calib: torch.Tensor, flatten_groups: list[list[int]] | None) -> dict[str, Any]:
    kw: dict[str, Any] = {"progress": False}
    if method in ("sleb", "blockpruner") and (args.score_windows or args.score_seqlen):
        kw["score_ids"] = calib[: args.score_windows or None, : args.score_seqlen or None]
    if method == "laco":
        kw["merge_layers"] = args.laco_merge_layers
    if method == "flatten-noprune" and flatten_groups is not None:
        kw["groups"] = flatten_groups
    return kw


def table(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    head = ["ratio", "method", "layers", "params (M)", "active (M)", "ppl", *tasks, "avg", "compress s", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        zs = r.get("zeroshot") or {}
        c = r.get("compression") or {}
        notes = [] if c.get("exportable", True) else ["in memory only (wider blocks)"]
        if c.get("info", {}).get("zeroed"):
            notes.append(f"{len(c['info']['zeroed'])} zeroed sub-blocks")
        cells = [
            f"{r['ratio']:.0%}",
            r["method"],
            str(r["layers"]),
            f"{r['params'] / 1e6:.1f}",
            f"{c.get('params_active', r['params']) / 1e6:.1f}",
            f"{r['perplexity']['ppl']:.2f}",
            *[f"{100 * headline(zs[t]):.1f}" if t in zs else "-" for t in tasks],
            "-" if zs.get("paper_avg") is None else f"{100 * zs['paper_avg']:.1f}",
            f"{c.get('seconds', 0.0):.0f}",
            "; ".join(notes),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ppl(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    dense = next(r for r in rows if r["method"] == "dense")
    ax.axhline(dense["perplexity"]["ppl"], color="gray", linestyle="--", label="dense")
    for method in ORDER:
        pts = sorted((r["ratio"], r["perplexity"]["ppl"]) for r in rows if r["method"] == method)
        if pts:  # every curve starts at the dense model (0% removed)
            pts = [(0.0, dense["perplexity"]["ppl"])] + pts
            ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=method)
    ax.set_yscale("log")
    ax.set_xlabel("blocks removed (%)")
    ax.set_ylabel("held-out WikiText-2 perplexity (log)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_similarity(sim: torch.Tensor, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(sim.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xlabel("input of block j (L = output of the last)")
    ax.set_ylabel("input of block i")
    ax.set_title("dense model: mean cos(h_i, h_j) on calibration tokens")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; choose among {', '.join(METHODS)}", file=sys.stderr)
        return 2
    methods = [m for m in ORDER if m in methods]
    ratios = [float(x) for x in args.ratios.split(",")]
    tasks = [t for t in args.tasks.split(",") if t]
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()

    dense, tok = load_model(args.model)
    ids = tokenize(tok, read_text(args.wikitext))
    calib = calibration_windows(ids, args.calib_samples, args.calib_seqlen, args.wikitext)
    evaluation = held_out(ids, args.calib_samples, args.calib_seqlen)
    n_layers = dense.config.num_hidden_layers
    zs_dir = args.zeroshot_dir if args.limit > 0 else None

    def evaluate(model) -> dict[str, Any]:
        return evaluate_model(model, tok, evaluation, args.eval_seqlen, args.eval_windows, 1, zs_dir, tasks, args.limit, progress=False)

    results: dict[str, Any] = {
        "setup": vars(args)
        | {"methods": methods, "original_layers": n_layers, "calibration_tokens": calib.numel(), "held_out_tokens": evaluation.numel()},
        "rows": [],
    }
    rows: list[dict[str, Any]] = results["rows"]

    def save() -> None:
        results["wall_s"] = time.perf_counter() - t_start
        write_text_atomic(os.path.join(args.out, "results.json"), json.dumps(results, indent=1, default=str))
        write_text_atomic(os.path.join(args.out, "results.md"), table(rows, tasks) + "\n")
        plot_ppl(rows, os.path.join(args.out, "ppl_vs_ratio.png"))

    t0 = time.perf_counter()
    sim = similarity_matrix(BlockRunner(dense, "cpu"), calib, list(dense.model.layers), args.heatmap_tokens)
    results["similarity"] = {"matrix": sim.tolist(), "seconds": time.perf_counter() - t0}
    plot_similarity(sim, os.path.join(args.out, "similarity.png"))
    rows.append({"method": "dense", "ratio": 0.0, **evaluate(dense)})
    save()
    print(f"dense: ppl {rows[0]['perplexity']['ppl']:.2f}", flush=True)

    for ratio in ratios:
        target = n_layers - max(1, round(ratio * n_layers))
        flatten_groups = None
        for method in methods:
            model = copy.deepcopy(dense)
            r = compress_with(method, model, calib, target, **method_kwargs(method, args, calib, flatten_groups))
            if method == "flatten":
                flatten_groups = r.info["groups"]
            row = {"method": method, "ratio": ratio, "target_layers": target, "compression": r.to_dict(), **evaluate(model)}
            rows.append(row)
            save()
            zs = row["zeroshot"] or {}
            print(
                f"{ratio:.0%} {method}: {r.layers} layers, ppl {row['perplexity']['ppl']:.2f}, avg {zs.get('paper_avg')}, "
                f"compress {r.seconds:.0f}s, eval {sum(row['timings_s'].values()):.0f}s",
                flush=True,
            )
            del model
    save()
    print(
        f"\n{args.model}: {n_layers} layers; calibration {args.calib_samples} x {args.calib_seqlen} WikiText-2 valid tokens; "
        f"perplexity on the next {args.eval_windows} x {args.eval_seqlen}; zero-shot first {args.limit} items per task; "
        f"wall {results['wall_s'] / 60:.1f} min\n"
    )
    print(table(rows, tasks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
