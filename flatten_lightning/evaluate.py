"""Evaluation command: WikiText perplexity by the protocol and zero-shot accuracy of one model.

    python -m flatten_lightning.evaluate --model runs/demo/model \\
        --wikitext ../shared/data/wikitext-2/valid.txt --seqlen 2048 --max-windows 16 \\
        --zeroshot-dir ../shared/data/zeroshot-dev --limit 100 --out results.json

``--model`` is anything ``sources.load_model`` takes: an exported directory, a hub id, a .gguf
file or ``smollm2``. ``--wikitext`` is a local file (read whole; .jsonl / .json as in ``data.read_text``)
or a Hugging Face dataset ``name:config:split`` (e.g. ``wikitext:wikitext-2-raw-v1:test``), whose
rows are joined with "\\n\\n" as the protocol does. Every number goes to ``--out`` as JSON and a
markdown table is printed. Inputs are checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flatten_lightning.atomic import write_text_atomic
from flatten_lightning.checks import at_least, check_device, check_seqlen
from flatten_lightning.data import read_text, tokenize
from flatten_lightning.export import REPORT_NAME, check_writable, count_parameters
from flatten_lightning.perplexity import perplexity
from flatten_lightning.sources import DTYPES, load_model
from flatten_lightning.zeroshot import PAPER_TASKS, check_data, evaluate_zeroshot, headline, local_name

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".raw", ".tokens")
# The keys every results file of ours has: --out may replace such a file, never anything else.
RESULT_KEYS = frozenset({"layers", "params", "perplexity", "zeroshot", "timings_s", "args"})


def looks_like_path(spec: str) -> bool:
    """A spec that names a local file (a text suffix, or a folder part that exists here), not a hub dataset."""
    name = spec.split(":")[0]
    return (
        spec.startswith(("/", ".", "~"))
        or any(part.endswith(TEXT_SUFFIXES) for part in spec.split(":"))
        or (os.sep in name and os.path.isdir(os.path.dirname(name)))
    )


def is_dataset_spec(spec: str) -> bool:
    """``name:config:split`` or ``name:split`` that is not an existing or mistyped local path."""
    return not os.path.exists(spec) and spec.count(":") in (1, 2) and not looks_like_path(spec)


def check_results_file(path: str, overwrite: bool) -> None:
    """``--out`` may replace an earlier results file of ours, or anything with ``--overwrite``; never a directory."""
    if os.path.isdir(path):
        raise FileExistsError(f"--out {path} is a directory. Fix: pass a file name such as {os.path.join(path, 'results.json')}.")
    if os.path.exists(path) and not overwrite:
        try:
            with open(path, encoding="utf-8") as f:
                ours = RESULT_KEYS <= set(json.load(f))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
            ours = False
        if not ours:
            raise FileExistsError(
                f"--out {path} exists and is not a results file of this command. Fix: choose another --out, or pass --overwrite to replace it."
            )
    check_writable(Path(path).parent)


def load_text(spec: str) -> str:
    """The evaluation text: a local file read whole, or a hub dataset's "text" rows joined with "\\n\\n"."""
    if os.path.exists(spec):
        return read_text(spec)
    if looks_like_path(spec):
        raise FileNotFoundError(
            f"text file {spec} does not exist (it looks like a local path, so the hub is not tried). Fix: check the path."
        )
    if not is_dataset_spec(spec):
        raise FileNotFoundError(
            f"text {spec} is neither an existing file nor a dataset name:config:split. "
            "Fix: pass a local .txt/.jsonl/.json file, or e.g. wikitext:wikitext-2-raw-v1:test."
        )
    import datasets  # only this path needs the hub

    parts = spec.split(":")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    rows = datasets.load_dataset(name, config or None, split=split)
    return "\n\n".join(rows["text"])  # the GPTQ / SparseGPT / SliceGPT protocol


@torch.no_grad()
def evaluate_model(
    model: Any,
    tokenizer: Any,
    ids: torch.Tensor | None = None,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    zeroshot_dir: str | None = None,
    tasks: Sequence[str] = PAPER_TASKS,
    limit: int | None = None,
    zs_batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity on the 1-D token tensor ``ids`` (windows of ``seqlen``) and zero-shot accuracy.

    Either part is skipped when its input (``ids`` / ``zeroshot_dir``) is None. Returns
    ``{"layers", "params", "perplexity": {ppl, nll, n_windows, n_tokens, seqlen, batch_size},
    "zeroshot": evaluate_zeroshot's dict, "timings_s"}``.
    """
    out: dict[str, Any] = {
        "layers": model.config.num_hidden_layers,
        "params": count_parameters(model),
        "perplexity": None,
        "zeroshot": None,
        "timings_s": {},
    }
    if ids is not None:
        t0 = time.perf_counter()
        r = perplexity(model, ids, seqlen, max_windows, batch_size, progress)
        out["perplexity"] = {
            "ppl": r.ppl,
            "nll": r.nll,
            "n_windows": r.n_windows,
            "n_tokens": r.n_tokens,
            "seqlen": r.seqlen,
            "batch_size": batch_size,
        }
        out["timings_s"]["perplexity"] = time.perf_counter() - t0
    if zeroshot_dir is not None:
        t0 = time.perf_counter()
        out["zeroshot"] = evaluate_zeroshot(model, tokenizer, zeroshot_dir, tasks, limit, zs_batch_size)
        out["timings_s"]["zeroshot"] = time.perf_counter() - t0
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown_table(rows: Sequence[dict[str, Any]], tasks: Sequence[str] = PAPER_TASKS) -> str:
    """One line per result of ``evaluate_model`` (each with a "name"): depth, params, ppl, accuracies.

    Accuracies are the paper's headline numbers (acc_norm where the task has it, else acc), in %.
    """
    zs_tasks = [t for t in tasks if any((r.get("zeroshot") or {}).get(t) for r in rows)]
    head = ["model", "layers", "params (M)", "ppl", *zs_tasks]
    if any((r.get("zeroshot") or {}).get("paper_avg") is not None for r in rows):
        head.append("5-task avg")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ppl = r.get("perplexity")
        zs = r.get("zeroshot") or {}
        cells = [
            str(r.get("name", "")),
            str(r["layers"]),
            f"{r['params'] / 1e6:.1f}",
            "-" if ppl is None else f"{ppl['ppl']:.2f}",
            *[_pct(headline(zs[t])) if t in zs else "-" for t in zs_tasks],
        ]
        if "5-task avg" in head:
            cells.append(_pct(zs.get("paper_avg")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flatten-evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="exported directory, hub id, .gguf file or 'smollm2'")
    p.add_argument("--wikitext", help="local text file (read whole) or a dataset name:config:split")
    p.add_argument("--seqlen", type=at_least(2), default=2048, help="tokens per perplexity window")
    p.add_argument("--max-windows", type=at_least(1), help="at most this many windows (default: all)")
    p.add_argument("--skip-tokens", type=at_least(0), default=0, help="drop this many leading tokens (e.g. the calibration tokens)")
    p.add_argument("--batch-size", type=at_least(1), default=1, help="perplexity windows per forward")
    p.add_argument("--zeroshot-dir", help="folder of zero-shot release files (see data README); omit to skip")
    p.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS), help="zero-shot tasks (space or comma separated)")
    p.add_argument("--limit", type=at_least(1), help="score only the first N items of each task")
    p.add_argument("--zs-batch-size", type=at_least(1), default=8, help="lm-eval batch size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="results.json", help="JSON file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not an earlier results file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one line naming the problem and the fix, exit status 2."""
    try:
        return run(parser().parse_args(argv))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    tasks = [t for item in args.tasks for t in item.split(",") if t]
    if args.wikitext is None and args.zeroshot_dir is None:
        raise ValueError("nothing to evaluate. Fix: pass --wikitext, --zeroshot-dir or both.")
    check_device(args.device)
    check_results_file(args.out, args.overwrite)
    if args.zeroshot_dir is not None:
        check_data(args.zeroshot_dir, [short for t in tasks if (short := local_name(t))])
    text = None if args.wikitext is None else load_text(args.wikitext)  # a missing or malformed file fails before the model loads
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, DTYPES[args.dtype])
    if text is not None:
        check_seqlen(model, args.seqlen, "--seqlen")
    model.to(args.device)
    result: dict[str, Any] = {"name": os.path.basename(os.path.normpath(args.model)), "model": args.model, "dtype": args.dtype}
    report = Path(args.model) / REPORT_NAME
    if report.is_file():  # say what produced the model, when the pipeline did
        result["compression"] = {k: v for k, v in json.loads(report.read_text()).items() if k in ("method", "original_layers", "layers")}
    ids, text_info = None, {}
    if text is not None:
        all_ids = tokenize(tokenizer, text)
        ids = all_ids[args.skip_tokens :]
        text_info = {"source": args.wikitext, "text_tokens": all_ids.numel(), "skip_tokens": args.skip_tokens}
    load_s = time.perf_counter() - t0
    result.update(
        evaluate_model(
            model,
            tokenizer,
            ids,
            args.seqlen,
            args.max_windows,
            args.batch_size,
            args.zeroshot_dir,
            tasks,
            args.limit,
            args.zs_batch_size,
            not args.quiet,
        )
    )
    if result["perplexity"] is not None:
        result["perplexity"].update(text_info)
    result["timings_s"]["load"] = load_s
    result["args"] = vars(args) | {"tasks": tasks}
    write_text_atomic(args.out, json.dumps(result, indent=2, default=str))
    print(markdown_table([result], tasks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
