"""Issue 12's table for one model at one depth ratio: perplexity, cost, recovery and zero-shot, in one run.

Rows (``--rows``, each compressed by the compression command in its own process, like ``compress_bench``):

    dense       the source model
    flatten     ours, the defaults
    fast        ours with ``--fast --input-stride 1`` (only the merged block re-scored; every block input kept)
    mixed       ours calibrated on WikiText, C4 and Alpaca windows in turn (``--calib-file`` with three files;
                the held-out windows stay the same WikiText tokens, which no calibration window reaches)
    paper       FlattenGPT with the paper's recipe (``flatten-paper``)
    shortgpt    ShortGPT (the peer zero-shot is compared with)
    recovered   the ``flatten`` export after LoRA recovery on Alpaca + C4 only (no WikiText token),
                ``benchmarks/recovery_unrelated.py``'s recipe ``--recover-recipe`` for ``--recover-steps``, at
                ``--recover-lr`` with ``--recover-schedule`` after ``--recover-warmup`` steps
    recovered-shortgpt
                the ``shortgpt`` export after the same recovery (the same batches): the peer given what ours
                is given, since a user recovers whichever model they ship
    recovered-mixed
                the ``mixed`` export after the same recovery: calibration and recovery both on more than one
                text style, for the zero-shot comparison with ``recovered-shortgpt``

Perplexity: WikiText-2 validation windows of 2048 tokens after the calibration tokens (the library's
protocol). Cost: compression seconds over the seconds of one dense forward over the calibration windows,
measured in a fresh process at the start of the first run and stored (``--retime-forward`` measures it again,
for when it was timed next to another job); every row's ratio is computed from it when printed.
Zero-shot (``--zeroshot-rows``): lm-eval on every item of the five dev slices (PIQA, WinoGrande, HellaSwag,
ARC-e, ARC-c; acc_norm where the task has it) and their mean.
Results go to ``--out``/<model>/results.json after every row; a row already there with the same settings (its
resolved ``CompressConfig`` included, so a changed default re-runs it) is not run again, so an interrupted run
continues; a compressed row asked for zero-shot later scores its timed export. The table ends with issue 12's
bars read off its rows (``bars``): the measured value of each and whether it is met.

    .venv/bin/python benchmarks/quality.py --model smollm2 [--rows dense,flatten,fast,mixed,paper,shortgpt,recovered]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict
from typing import Any

import torch
from ablate import MIXES, TEXTS
from compress_bench import REFERENCE, WIKITEXT, add_setup_args, run_compression
from recovery_unrelated import RECIPES, Setup, recover

from flatten_lightning import methods
from flatten_lightning.atomic import write_text_atomic
from flatten_lightning.cli import method_options, parser, target_depth
from flatten_lightning.data import held_out, read_text, tokenize
from flatten_lightning.perplexity import perplexity
from flatten_lightning.schedule import SCHEDULES
from flatten_lightning.sources import load_model, resolve_source
from flatten_lightning.zeroshot import PAPER_TASKS, evaluate_zeroshot, headline, paired_gap

HERE = os.path.dirname(os.path.abspath(__file__))
ZEROSHOT_DIR = os.path.join(HERE, "..", "..", "shared", "data", "zeroshot-dev")
# Row -> the compression command's method and extra flags.
COMPRESSED: dict[str, tuple[str, list[str]]] = {
    "flatten": ("flatten", []),
    "fast": ("flatten", ["--fast", "--input-stride", "1"]),
    "mixed": ("flatten", []),
    "paper": ("flatten-paper", []),
    "shortgpt": ("shortgpt", []),
}
# Recovered row -> the compressed row whose export it trains.
RECOVERED: dict[str, str] = {"recovered": "flatten", "recovered-shortgpt": "shortgpt", "recovered-mixed": "mixed"}
ROWS = ("dense", *COMPRESSED, *RECOVERED)
# Rows calibrated on other text than WikiText alone (windows in turn from each file).
CALIBRATION: dict[str, list[str]] = {"mixed": [TEXTS[t] for t in MIXES["mix3"]]}


def compressed_config(name: str, target: int) -> dict[str, Any] | None:
    """The full ``CompressConfig`` the compression command resolves for row ``name`` (None: not a flatten method).

    Part of a row's settings, so a row measured before a default changed is measured again, not reused.
    """
    method, flags = COMPRESSED[name]
    if method not in methods.FLATTEN_METHODS:
        return None
    options = method_options(parser().parse_args(["--ratio", "0.5", "--calib-file", "-", "--out", "-", "--method", method, *flags]))
    return asdict(methods.compress_config(method, target, **{k: v for k, v in options.items() if k in methods.CONFIG_FIELDS}))


def recovery_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The recovered rows' training: recipe, steps of 4 x 256 tokens and the learning-rate schedule (all but the
    recipe named as recovery_unrelated's ``Setup`` fields, which ``recovery_setup`` passes on)."""
    return {
        "recipe": args.recover_recipe,
        "steps": args.recover_steps,
        "lr": args.recover_lr,
        "lr_schedule": args.recover_schedule,
        "warmup_steps": args.recover_warmup,
    }


def row_settings(name: str, target: int, zeroshot: bool, recovery: dict[str, Any]) -> dict[str, Any]:
    """What row ``name`` depends on; a stored row with other settings is measured again.

    A compressed row's CompressConfig is part of it (dense and a peer's row, ShortGPT, have none); a recovered
    row starts from its compressed row's export, so it carries that row's config and its own training
    (``recovery_settings``).
    """
    want: dict[str, Any] = {"zeroshot": zeroshot}
    built = RECOVERED.get(name, name)
    config = compressed_config(built, target) if built in COMPRESSED else None
    if config is not None:
        want["config"] = config
    if name in RECOVERED:
        want |= recovery
    return want


def trains_as_own_source(name: str) -> bool:
    """Whether recovered row ``name`` trains its export as a model of its own: a peer's method (ShortGPT) leaves
    no FlattenGPT plan in its report to replay on the dense source, so the dense model cannot teach it."""
    return COMPRESSED[RECOVERED[name]][0] not in methods.FLATTEN_METHODS


def recovery_setup(name: str, out_root: str, source: str, args: argparse.Namespace) -> tuple[Setup, bool]:
    """The recovery of recovered row ``name`` and whether it trains its export as a model of its own.

    Ours is recovered from its export replayed on the dense source (``FlattenModule.start_from_export``). A
    peer's export (ShortGPT) holds no plan to replay, so it is loaded as the source itself and trained the same
    way (``recover(..., dense=True)``): same recipe, same batches, same held-out windows; step 0 is the export.
    """
    export = os.path.join(out_root, RECOVERED[name])
    own = trains_as_own_source(name)
    training = {k: v for k, v in recovery_settings(args).items() if k != "recipe"}
    setup = Setup(
        export,
        export if own else source,
        calib_samples=args.calib_samples,
        calib_seqlen=args.calib_seqlen,
        eval_windows=args.eval_windows,
        eval_every=training["steps"],  # one point: the model as trained
        **training,
    )
    return setup, own


def known_perplexities(rows: dict[str, Any], name: str) -> dict[str, float]:
    """What recovered row ``name``'s recovery would measure again, from the rows already run on the same windows:
    {dense: its source, compressed: its export} (recovery_unrelated's reference). A peer's export is its own
    source; a value not yet measured is left out, and the recovery measures it."""
    base = RECOVERED[name]
    known = {"dense": base} if trains_as_own_source(name) else {"dense": "dense", "compressed": base}
    return {key: rows[row]["ppl"] for key, row in known.items() if row in rows}


def export_key(settings: dict[str, Any]) -> dict[str, Any]:
    """A row's settings but whether it is scored zero-shot: what its export depends on."""
    return {k: v for k, v in settings.items() if k != "zeroshot"}


def measure(model, tok, evaluation: torch.Tensor, args: argparse.Namespace, zeroshot: bool, ppl: float | None = None) -> dict[str, Any]:
    """Held-out perplexity (``ppl`` when already measured on these windows) and, if asked, the zero-shot accuracies
    (every item) of ``model``."""
    if ppl is None:
        ppl = perplexity(model, evaluation, 2048, args.eval_windows, progress=False).ppl
    row: dict[str, Any] = {"ppl": ppl}
    if zeroshot:
        zs = evaluate_zeroshot(model, tok, ZEROSHOT_DIR, PAPER_TASKS, limit=args.zs_limit)
        row["zeroshot"] = {t: zs[t] for t in PAPER_TASKS} | {"avg": zs["paper_avg"]}
    return row


def table(results: dict[str, Any]) -> str:
    rows, dense = results["rows"], results["rows"].get("dense", {}).get("ppl")
    lines = [
        "| row | held-out ppl | / dense | compress s | / forward | " + " | ".join(PAPER_TASKS) + " | 5-task avg |",
        "|---|---|---|---|---|" + "---|" * (len(PAPER_TASKS) + 1),
    ]
    for name in ROWS:
        if name not in rows:
            continue
        r = rows[name]
        zs = r.get("zeroshot")
        accs = [f"{100 * headline(zs[t]):.1f}" for t in PAPER_TASKS] if zs else ["-"] * 5
        ratio = f"{r['ppl'] / dense:.3f}" if dense else "-"
        cost = [f"{r['seconds']:.0f}", f"{r['seconds'] / results['forward_s']:.2f}"] if "seconds" in r else ["-", "-"]
        avg = f"{100 * zs['avg']:.1f}" if zs else "-"
        lines.append(f"| {name} | {r['ppl']:.2f} | {ratio} | " + " | ".join(cost + accs) + f" | {avg} |")
    return "\n".join(lines) + "\n"


# Issue 12's thresholds; the bars table prints them from here, so the text and the test of each cannot differ.
MAX_RATIO, MAX_RECOVERED, MIN_ZS_GAIN, MAX_FAST_RATIO, MAX_FAST_FORWARDS = 1.35, 1.15, 2.0, 1.02, 2.5


def bars(results: dict[str, Any]) -> str:
    """Issue 12's bars read off the rows present: a markdown table of measured value and whether it is met.

    A bar whose rows were not run is left out rather than guessed."""
    rows = results["rows"]
    ppl = {name: r["ppl"] for name, r in rows.items()}
    avg = {name: 100 * r["zeroshot"]["avg"] for name, r in rows.items() if "zeroshot" in r}
    lines = ["| bar | measured | value | threshold | met |", "|---|---|---|---|---|"]

    def line(name: str, what: str, value: str, threshold: str, met: bool) -> None:
        lines.append(f"| {name} | {what} | {value} | {threshold} | {'yes' if met else 'no'} |")

    if {"dense", "flatten"} <= ppl.keys():
        r = ppl["flatten"] / ppl["dense"]
        line("no training", "ours / dense held-out ppl", f"{r:.3f}", f"<= {MAX_RATIO}", r <= MAX_RATIO)
    if {"dense", "recovered"} <= ppl.keys():
        r = ppl["recovered"] / ppl["dense"]
        line("recovery on unrelated text", "recovered / dense held-out ppl", f"{r:.3f}", f"<= {MAX_RECOVERED}", r <= MAX_RECOVERED)

    def zeroshot_gap(name: str, what: str, ours: str, peer: str) -> None:
        """ours - peer in 5-task average points, with its paired standard error where both rows kept their items."""
        if not {ours, peer} <= avg.keys():
            return
        gap = avg[ours] - avg[peer]
        value = f"{gap:+.1f}"
        a, b = rows[ours]["zeroshot"], rows[peer]["zeroshot"]
        if all("items" in scored.get(t, {}) for scored in (a, b) for t in PAPER_TASKS):  # rows scored before items were kept have none
            value += f" (paired s.e. {100 * paired_gap(a, b)[1]:.1f})"
        line(name, what, value, f">= +{MIN_ZS_GAIN}", gap >= MIN_ZS_GAIN)

    zeroshot_gap("zero-shot", "ours - ShortGPT, 5-task avg (points)", "flatten", "shortgpt")
    # Beside the bar: the same comparison for ours calibrated on mixed text, and for both models given the
    # same recovery.
    zeroshot_gap("zero-shot, mixed calibration", "ours (mixed) - ShortGPT, 5-task avg (points)", "mixed", "shortgpt")
    after = "after the same recovery, 5-task avg (points)"
    zeroshot_gap("zero-shot, both recovered", f"ours - ShortGPT {after}", "recovered", "recovered-shortgpt")
    zeroshot_gap("zero-shot, mixed, both recovered", f"ours (mixed) - ShortGPT {after}", "recovered-mixed", "recovered-shortgpt")
    if {"flatten", "fast"} <= ppl.keys() and "seconds" in rows["fast"]:
        r, cost = ppl["fast"] / ppl["flatten"], rows["fast"]["seconds"] / results["forward_s"]
        met = r <= MAX_FAST_RATIO and cost <= MAX_FAST_FORWARDS
        line(
            "fast mode",
            "fast / ours held-out ppl; its cost in forwards",
            f"{r:.3f} at {cost:.2f}",
            f"<= {MAX_FAST_RATIO} at <= {MAX_FAST_FORWARDS}",
            met,
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setup_args(ap)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma separated among {', '.join(ROWS)}")
    ap.add_argument(
        "--zeroshot-rows",
        default="dense,flatten,mixed,shortgpt,recovered,recovered-shortgpt,recovered-mixed",
        help="rows scored zero-shot (every dev item)",
    )
    ap.add_argument("--zs-limit", type=int, default=None, help="items per task (default: all; for a quick look only)")
    ap.add_argument("--recover-recipe", default="ce", choices=RECIPES)
    ap.add_argument("--recover-steps", type=int, default=64, help="LoRA steps of 4 x 256 tokens")
    ap.add_argument("--recover-lr", type=float, default=5e-4, help="peak learning rate of the recovery")
    ap.add_argument("--recover-schedule", default="constant", choices=SCHEDULES, help="cosine decays to 0 at the last step")
    ap.add_argument("--recover-warmup", type=int, default=0, help="steps of linear warmup")
    ap.add_argument("--retime-forward", action="store_true", help="time the reference forward again (the cost column's unit)")
    ap.add_argument("--out", default="runs/quality")
    args = ap.parse_args()
    rows, zs_rows = args.rows.split(","), set(args.zeroshot_rows.split(","))
    for name in rows + sorted(zs_rows - {""}):
        if name not in ROWS:
            ap.error(f"unknown row {name!r}; known: {', '.join(ROWS)}")
    if args.recover_lr <= 0 or args.recover_warmup < 0 or args.recover_warmup >= args.recover_steps:
        ap.error(
            f"--recover-lr {args.recover_lr} must be > 0 and --recover-warmup {args.recover_warmup} in [0, --recover-steps "
            f"{args.recover_steps}): the recovered rows would not train"
        )
    for name, base in RECOVERED.items():
        if name in rows and base not in rows:
            ap.error(f"the {name} row starts from the {base} row's export: add {base} to --rows")
    for name in RECOVERED:
        if name in rows and trains_as_own_source(name) and args.recover_recipe != "ce":
            # Its export is trained as a model of its own: the only teacher there would be itself.
            ap.error(f"--recover-recipe {args.recover_recipe} distils from the dense model, which the {name} row has no route to: use ce")

    source = resolve_source(args.model)
    out_root = os.path.join(args.out, os.path.basename(os.path.normpath(args.model)))
    path = os.path.join(out_root, "results.json")
    setup = {k: getattr(args, k) for k in ("model", "ratio", "calib_samples", "calib_seqlen", "eval_windows", "zs_limit")}
    results: dict[str, Any] = {"setup": setup, "rows": {}}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
        if results["setup"] != setup:
            raise SystemExit(f"error: {path} holds another setup ({results['setup']}). Fix: pass another --out.")

    def save() -> None:
        write_text_atomic(path, json.dumps(results, indent=2))
        write_text_atomic(os.path.join(out_root, "results.md"), table(results) + "\n" + bars(results))

    if "forward_s" not in results or args.retime_forward:
        cmd = [sys.executable, "-c", REFERENCE, source, WIKITEXT, str(args.calib_samples), str(args.calib_seqlen)]
        results["forward_s"] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])[
            "forward_s"
        ]
    dense, tok = load_model(source)
    depth = dense.config.num_hidden_layers
    target = target_depth(depth, None, args.ratio)
    evaluation = held_out(tokenize(tok, read_text(WIKITEXT)), args.calib_samples, args.calib_seqlen)
    for name in rows:
        want = row_settings(name, target, name in zs_rows, recovery_settings(args))
        if results["rows"].get(name, {}).get("settings") == want:
            continue
        print(f"row {name} ...", flush=True)
        if name == "dense":
            row = measure(dense, tok, evaluation, args, want["zeroshot"])
        elif name in RECOVERED:
            recipe, own = recovery_setup(name, out_root, source, args)
            points, module, _ = recover(recipe, args.recover_recipe, known_perplexities(results["rows"], name), dense=own)
            # The last point is the held-out perplexity of the model as trained: the merged model's (recovery_unrelated).
            row = measure(module.base_model, module.tokenizer, evaluation, args, want["zeroshot"], ppl=points[-1]["ppl"])
            row["curve"] = [(p["tokens"], p["ppl"]) for p in points]
        else:
            out = os.path.join(out_root, name)
            before = results["rows"].get(name, {})
            if (
                export_key(before.get("settings", {})) == export_key(want)
                and "seconds" in before
                and os.path.exists(os.path.join(out, "config.json"))
            ):
                # Only the zero-shot setting changed: score the export that was timed, keep its cost.
                seconds = before["seconds"]
            else:
                method, flags = COMPRESSED[name]
                report = run_compression(source, method, target, args.calib_samples, args.calib_seqlen, out, flags, CALIBRATION.get(name))
                seconds = report["timings_s"]["compression"]
            model, _ = load_model(out)
            row = measure(model, tok, evaluation, args, want["zeroshot"])
            row["seconds"] = seconds
            del model
        results["rows"][name] = {"settings": want, **row}
        save()
        print(
            f"row {name}: held-out ppl {row['ppl']:.3f}"
            + (f", 5-task avg {100 * row['zeroshot']['avg']:.1f}" if "zeroshot" in row else ""),
            flush=True,
        )
    save()
    print(
        f"\n{args.model} {depth} -> {target} layers; {args.calib_samples} x {args.calib_seqlen} WikiText calibration tokens; "
        f"held-out ppl on the next {args.eval_windows} x 2048; one calibration forward {results['forward_s']:.1f}s\n"
    )
    print(table(results))
    print(bars(results))


if __name__ == "__main__":
    main()
