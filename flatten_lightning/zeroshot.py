"""Offline zero-shot evaluation through lm-eval's own harness.

The eight benchmarks run as local lm-eval tasks (``flatten_lightning/tasks/fl_*.yaml``) that copy the
stock tasks' prompts, targets, choices and metrics but read the public release files from a
directory given at run time, so nothing is fetched from the Hugging Face hub. The in-memory model is
wrapped in ``lm_eval.models.huggingface.HFLM`` and scored by ``lm_eval.simple_evaluate``, so the
tokenization, log-likelihoods, ``acc`` / ``acc_norm`` and LAMBADA perplexity are lm-eval's.

Task names that are not local (e.g. ``mmlu``) pass through to lm-eval unchanged and load from the
hub, where one is reachable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flatten_lightning.tasks import TASKS_DIR
from flatten_lightning.tasks.loaders import DATA_DIR_KEY, READERS, TASK_FILES, missing_files

TASKS: tuple[str, ...] = (
    "piqa",
    "winogrande",
    "hellaswag",
    "arc_easy",
    "arc_challenge",
    "boolq",
    "openbookqa",
    "lambada",
)
PAPER_TASKS: tuple[str, ...] = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")

# Our short name -> the local lm-eval task that implements it.
LM_EVAL_TASKS: dict[str, str] = {t: f"fl_{t}" for t in TASKS} | {"lambada": "fl_lambada_openai"}
# Other spellings a user may reach for; they mean the local task, not the hub one.
ALIASES: dict[str, str] = {"lambada_openai": "lambada"} | {v: k for k, v in LM_EVAL_TASKS.items()}

# Chance accuracy when every item has the task's usual number of choices. ARC (a few items have 3
# or 5 choices) is exact only per item: see chance_accuracy. LAMBADA is open-vocabulary.
CHANCE: dict[str, float] = {
    "piqa": 0.5,
    "winogrande": 0.5,
    "hellaswag": 0.25,
    "arc_easy": 0.25,
    "arc_challenge": 0.25,
    "boolq": 0.5,
    "openbookqa": 0.25,
    "lambada": 0.0,
}


def local_name(task: str) -> str | None:
    """The short local name for ``task`` ("piqa", "fl_piqa", "lambada_openai" ...), or None."""
    task = ALIASES.get(task, task)
    return task if task in LM_EVAL_TASKS else None


def chance_accuracy(task: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> float:
    """Accuracy of uniform guessing on ``task``.

    With ``data_dir`` the mean of 1/num_choices is taken over the items evaluated (the first
    ``limit``), which is exact for ARC's odd 3- and 5-choice items; without it, the usual count.
    """
    short = local_name(task)
    if short is None:
        raise ValueError(f"no chance level known for task {task!r}; known: {', '.join(TASKS)}")
    if data_dir is None or short not in ("arc_easy", "arc_challenge", "openbookqa"):
        return CHANCE[short]
    docs = READERS[short](data_dir)[:limit]
    return sum(1.0 / len(d["choices"]["text"]) for d in docs) / len(docs)


def check_data(data_dir: str | os.PathLike | None, tasks: Sequence[str]) -> None:
    """Fail before any model work when the data directory or a task's file is missing, or an item is bad.

    ``tasks`` are local short names. Every file is read once here, so a bad label or a missing key is a
    ``ZeroShotDataError`` naming the file and line (see ``tasks.loaders.check_label``), not a wrong
    accuracy or an error deep inside lm-eval.
    """
    layout = "; ".join(f"{t}: {', '.join(rel for rel, _ in TASK_FILES[t])}" for t in tasks)
    if data_dir is None or not Path(data_dir).is_dir():
        raise FileNotFoundError(
            f"zero-shot data directory {data_dir} does not exist. Fix: pass data_dir= a folder holding the "
            f"release files in this layout ({layout})."
        )
    missing = [line for t in tasks for line in missing_files(t, data_dir)]
    if missing:
        raise FileNotFoundError(
            "zero-shot data files missing:\n  "
            + "\n  ".join(missing)
            + f"\nFix: put the public release files there, or evaluate fewer tasks (tasks=...). Layout: {layout}."
        )
    for t in tasks:
        READERS[t](data_dir)


def _task_manager(data_dir: str | os.PathLike | None, with_stock: bool) -> Any:
    """A TaskManager that knows our local tasks and passes them the data directory.

    Indexing lm-eval's ~15k stock task configs costs seconds, so it is only done when a hub task
    was asked for.
    """
    from lm_eval.tasks import TaskManager

    metadata = {DATA_DIR_KEY: str(Path(data_dir).resolve())} if data_dir is not None else None
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=with_stock, metadata=metadata)


def _resolve(tasks: Sequence[str], data_dir: str | os.PathLike | None) -> tuple[list[tuple[str, str]], Any]:
    """Map requested names to ``(result key, lm-eval task name)`` pairs and build the TaskManager."""
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise ValueError(f"no tasks given; known local tasks: {', '.join(TASKS)}")
    plan: list[tuple[str, str]] = []
    for t in tasks:
        short = local_name(t)
        pair = (short, LM_EVAL_TASKS[short]) if short else (t, t)  # not ours: lm-eval's own name
        if pair not in plan:  # "piqa" and "fl_piqa" are one task; lm-eval refuses duplicates
            plan.append(pair)
    local = [key for key, name in plan if key != name]
    hub = [name for key, name in plan if key == name]
    if local:
        check_data(data_dir, local)
    manager = _task_manager(data_dir, with_stock=bool(hub))
    unknown = [name for name in hub if name not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown task(s) {', '.join(unknown)}. Local tasks: {', '.join(TASKS)} "
            f"(also accepted: {', '.join(sorted(ALIASES))}); any other name must be an lm-eval task "
            "(see `lm_eval ls tasks`)."
        )
    return plan, manager


def _summarize(out: dict[str, Any], name: str) -> dict[str, Any]:
    """Per-task numbers from a ``simple_evaluate`` result: acc, acc_norm, n, chance, stderr."""
    metrics = out["results"].get(name, {})
    samples = out.get("samples", {}).get(name, [])
    n = int(out["n-samples"][name]["effective"]) if name in out.get("n-samples", {}) else len(samples)
    per_item = [s["acc"] for s in samples if "acc" in s]
    summary: dict[str, Any] = {
        "task": name,
        "acc": metrics.get("acc,none"),
        "acc_norm": metrics.get("acc_norm,none"),
        "n": n,
    }
    # Each item's headline score in doc order, so two models can be compared item by item (paired_gap).
    key = headline_metric(summary)
    if samples and all(key in s for s in samples):
        summary["items"] = [float(s[key]) for s in sorted(samples, key=lambda s: s["doc_id"])]
    if "perplexity,none" in metrics:
        summary["perplexity"] = metrics["perplexity,none"]
    # Standard error of the mean, as lm-eval's closed form would give; computed here because
    # asking lm-eval for stderrs also bootstraps LAMBADA's perplexity in a process pool.
    if len(per_item) > 1:
        summary["acc_stderr"] = mean_and_stderr(per_item)[1]
    # Chance over the items actually scored: a multiple-choice item sends one request per choice.
    choice_counts = [len(s["arguments"]) for s in samples if s.get("arguments")]
    is_mc = out.get("configs", {}).get(name, {}).get("output_type") == "multiple_choice"
    summary["chance"] = sum(1.0 / k for k in choice_counts) / len(choice_counts) if is_mc and choice_counts else 0.0
    return summary


def _collect(out: dict[str, Any], plan: list[tuple[str, str]]) -> dict[str, Any]:
    """Summaries keyed by our short names; a hub group or tag also reports each of its tasks."""
    results: dict[str, Any] = {}
    leaves = list(out.get("samples", {}))
    for key, name in plan:
        if name in leaves:
            results[key] = _summarize(out, name)
            continue
        for leaf in leaves:  # the tasks a passed-through group or tag expanded to
            if leaf not in results and leaf not in LM_EVAL_TASKS.values():
                results[leaf] = _summarize(out, leaf)
        if name in out["results"]:  # the group's own aggregate, where lm-eval computed one
            results[key] = _summarize(out, name)
    return results


def headline_metric(result: dict[str, Any]) -> str:
    """The metric the paper reports for a task: "acc_norm" where the task has it, else "acc"."""
    return "acc_norm" if result.get("acc_norm") is not None else "acc"


def headline(result: dict[str, Any]) -> float | None:
    """The number the paper reports for a task (``headline_metric``)."""
    return result.get(headline_metric(result))


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean of n >= 2 values and its standard error sqrt(s^2 / n), s^2 the sample variance (n - 1)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def paper_average(results: dict[str, Any], field: str = "headline") -> float | None:
    """Mean over PAPER_TASKS of the headline accuracy (or of ``field``); None unless all five ran."""
    if not all(t in results for t in PAPER_TASKS):
        return None
    values = [headline(results[t]) if field == "headline" else results[t][field] for t in PAPER_TASKS]
    return sum(values) / len(values)


def paired_gap(a: dict[str, Any], b: dict[str, Any], tasks: Sequence[str] = PAPER_TASKS) -> tuple[float, float]:
    """Difference of two models' task-average headline accuracy and its paired standard error.

    With x_ti, y_ti the two models' scores (0/1) on item i of task t (``items`` of each task's result, the
    same items in the same order), d_ti = x_ti - y_ti, n_t items and T tasks:
        gap = (1 / T) sum_t mean_i d_ti,     se = (1 / T) sqrt(sum_t s_t^2 / n_t),
    s_t^2 the sample variance of d_ti. Pairing removes what both models find easy or hard, so se is
    smaller than from the two accuracies alone. Returns (gap, se) as fractions.
    """
    total, var = 0.0, 0.0  # sums over tasks of mean_i d_ti and of its squared standard error
    for t in tasks:
        x, y = a[t].get("items"), b[t].get("items")
        if x is None or y is None or len(x) != len(y) or len(x) < 2:
            raise ValueError(
                f"task {t}: paired_gap needs the same scored items from both models (got {None if x is None else len(x)} "
                f"and {None if y is None else len(y)}). Fix: evaluate both on the same items with evaluate_zeroshot."
            )
        mean, se = mean_and_stderr([xi - yi for xi, yi in zip(x, y)])
        total, var = total + mean, var + se * se
    return total / len(tasks), math.sqrt(var) / len(tasks)


def evaluate_zeroshot(
    model: Any,
    tokenizer: Any,
    data_dir: str | os.PathLike | None,
    tasks: Sequence[str] = TASKS,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Zero-shot accuracy of an in-memory HF causal LM on local (and optionally hub) lm-eval tasks.

    Returns ``{task: {"acc", "acc_norm" (None where the task has none), "n", "chance", ...},
    "paper_avg": mean over PAPER_TASKS of acc_norm-else-acc, "paper_chance_avg": the same for chance}``.
    ``limit`` scores only the first ``limit`` items of each task.
    """
    plan, manager = _resolve(tasks, data_dir)

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    was_training = getattr(model, "training", False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[name for _, name in plan],
            task_manager=manager,
            limit=limit,
            bootstrap_iters=0,
            log_samples=True,  # per-item results give n, chance and the stderr
            # Zero-shot log-likelihood scoring draws no random numbers; leave the caller's RNGs alone.
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
        )
    finally:
        model.train(was_training)  # HFLM switched it to eval mode
    results = _collect(out, plan)
    results["paper_avg"] = paper_average(results)
    results["paper_chance_avg"] = paper_average(results, "chance")
    return results


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table of :func:`evaluate_zeroshot`'s result."""

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:6.2f}"

    lines = [f"{'task':<15}{'n':>6}{'acc':>8}{'acc_norm':>10}{'chance':>8}"]
    for key, r in results.items():
        if isinstance(r, dict):
            extra = f"  ppl {r['perplexity']:.2f}" if "perplexity" in r else ""
            lines.append(f"{key:<15}{r['n']:>6}{pct(r['acc']):>8}{pct(r['acc_norm']):>10}{pct(r['chance']):>8}{extra}")
    if results.get("paper_avg") is not None:
        lines.append(f"{'paper 5-task avg':<21}{pct(results['paper_avg']):>8} (chance {pct(results['paper_chance_avg']).strip()})")
    return "\n".join(lines)
