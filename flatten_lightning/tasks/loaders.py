"""Readers for the zero-shot benchmarks' public release files, and the lm-eval hooks that use them.

Every reader returns rows in the schema of the Hugging Face dataset that lm-eval's stock task reads
(``baber/piqa``, ``allenai/ai2_arc``, ``Rowan/hellaswag``, ...), so the stock ``doc_to_text`` /
``doc_to_target`` / ``doc_to_choice`` templates apply to them unchanged (see the ``fl_*.yaml`` files
next to this module). The data directory arrives at run time through the lm-eval task metadata key
``fl_data_dir`` (``TaskManager(metadata=...)`` or ``lm_eval --metadata``).
"""

from __future__ import annotations

import bz2
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets

from flatten_lightning.data import TextFileError, read_jsonl

DATA_DIR_KEY = "fl_data_dir"

# Files each task reads, relative to the data directory, with what they are (for error messages).
TASK_FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "piqa": (
        ("piqa/valid.jsonl", "PIQA validation questions (release valid.jsonl)"),
        ("piqa/valid-labels.lst", "PIQA validation labels (release valid-labels.lst)"),
    ),
    "arc_easy": (("arc_easy/ARC-Easy-Test.jsonl", "AI2 ARC-Easy test split (release jsonl)"),),
    "arc_challenge": (("arc_challenge/ARC-Challenge-Test.jsonl", "AI2 ARC-Challenge test split (release jsonl)"),),
    "winogrande": (
        ("winogrande/winogrande.jsonl", "WinoGrande dev in partial-scoring form"),
        ("winogrande/dev-labels.lst", "WinoGrande dev labels (release dev-labels.lst)"),
    ),
    "hellaswag": (("hellaswag/hellaswag_val_full.txt.bz2", "HellaSwag validation text dump, 6 lines per item"),),
    "boolq": (("boolq/val.jsonl", "BoolQ dev as in SuperGLUE (val.jsonl)"),),
    "openbookqa": (("openbookqa/test.tsv", "OpenBookQA main test split (release test.tsv)"),),
    "lambada": (("lambada/lambada_test.jsonl", "LAMBADA OpenAI-variant test set (lambada_test.jsonl)"),),
}


def task_paths(task: str, data_dir: str | os.PathLike) -> list[Path]:
    """The files ``task`` reads under ``data_dir``."""
    return [Path(data_dir) / rel for rel, _ in TASK_FILES[task]]


def missing_files(task: str, data_dir: str | os.PathLike) -> list[str]:
    """Human-readable lines for each of ``task``'s files that does not exist."""
    return [f"{Path(data_dir) / rel} ({what})" for rel, what in TASK_FILES[task] if not (Path(data_dir) / rel).is_file()]


class ZeroShotDataError(ValueError):
    """A zero-shot release file with a bad item: the message names the file and line."""


def bad_item(path: Path, line: int, problem: str) -> ZeroShotDataError:
    """The one error every reader raises for a bad item (missing key, out-of-range label, misalignment)."""
    return ZeroShotDataError(f"{path} line {line}: {problem}. Fix: repair that line, or replace the file with the public release.")


def check_label(value: Any, allowed: dict[str, Any], path: Path, line: int) -> Any:
    """The canonical label for a raw ``value`` whose string form must be a key of ``allowed``.

    Labels are compared as stripped strings (``True`` -> "True"), so "yes" for a true/false task
    or "3" for a 2-choice one is refused instead of read as something else.
    """
    key = str(value).strip()
    if key not in allowed:
        raise bad_item(path, line, f"label {value!r} is not one of {', '.join(allowed)}")
    return allowed[key]


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, Any]]]:
    try:
        return read_jsonl(path, required)
    except TextFileError as e:
        raise ZeroShotDataError(str(e)) from None


def _read_lines(path: Path) -> list[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]


def _aligned(rows: list[Any], labels: list[Any], rows_path: Path, labels_path: Path) -> None:
    # A labels file one line short silently shifts every later label: refuse instead.
    if len(rows) != len(labels):
        raise ZeroShotDataError(
            f"{rows_path} has {len(rows)} items but {labels_path} has {len(labels)} labels. Fix: use the matching release files."
        )


# ----------------------------------------------------------------------------------------- readers
def read_piqa(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """PIQA rows ``{goal, sol1, sol2, label}`` with the 0/1 label from the line-aligned labels file."""
    qpath, lpath = task_paths("piqa", data_dir)
    rows, labels = _read_jsonl(qpath, ("goal", "sol1", "sol2")), _read_lines(lpath)
    _aligned(rows, labels, qpath, lpath)
    return [
        {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": check_label(lab, {"0": 0, "1": 1}, lpath, n)}
        for (_, r), (n, lab) in zip(rows, labels)
    ]


def _read_arc(task: str, data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    # The release nests the stem and choices under "question"; the hub schema flattens them and keeps
    # the labels as released ("A".."E" or "1".."4"), so the stock `choices.label.index(answerKey)`
    # maps numeric keys too.
    path = task_paths(task, data_dir)[0]
    out = []
    for n, r in _read_jsonl(path, ("id", "question", "answerKey")):
        if not isinstance(r["question"], dict) or not {"stem", "choices"} <= r["question"].keys():
            raise bad_item(path, n, "'question' has no 'stem' and 'choices'")
        choices = r["question"]["choices"]
        labels = [str(c.get("label")) for c in choices]
        check_label(r["answerKey"], {lab: lab for lab in labels}, path, n)
        out.append(
            {
                "id": r["id"],
                "question": r["question"]["stem"],
                "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
                "answerKey": r["answerKey"],
            }
        )
    return out


def read_arc_easy(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """ARC-Easy rows in the ``allenai/ai2_arc`` schema."""
    return _read_arc("arc_easy", data_dir)


def read_arc_challenge(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """ARC-Challenge rows in the ``allenai/ai2_arc`` schema."""
    return _read_arc("arc_challenge", data_dir)


def read_winogrande(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """WinoGrande rows ``{context_options, continuation, answer}``; ``answer`` is the official "1"/"2"."""
    qpath, lpath = task_paths("winogrande", data_dir)
    rows, labels = _read_jsonl(qpath, ("context_options", "continuation")), _read_lines(lpath)
    _aligned(rows, labels, qpath, lpath)
    out = []
    for (i, r), (n, lab) in zip(rows, labels):
        check_label(lab, {"1": "1", "2": "2"}, lpath, n)
        # The jsonl's own 0-based "gold" must agree with the official label, else the files are misaligned.
        if "gold" in r and str(r["gold"]) != str(int(lab) - 1):
            raise bad_item(qpath, i, f"gold={r['gold']} disagrees with {lpath} line {n} label {lab}")
        out.append({"context_options": list(r["context_options"]), "continuation": r["continuation"], "answer": lab})
    return out


def _split_context(ctx: str) -> tuple[str, str]:
    """Recover HellaSwag's ``(ctx_a, ctx_b)`` from the joined ``ctx`` the text dump keeps.

    lm-eval capitalizes ``ctx_b`` (``ctx_a + " " + ctx_b.capitalize()``), so the split matters.
    WikiHow items (the dump starts them with "How to", after "[header]" was dropped) have an empty
    ``ctx_b``; ActivityNet items end in an unfinished lower-case noun phrase after the last sentence,
    which is ``ctx_b`` (e.g. "A man is sitting on a roof. he").
    """
    if ctx.startswith("How to") or re.search(r"[.!?][\"')]?$", ctx):
        return ctx, ""  # ends on a finished sentence: nothing to capitalize
    m = re.match(r"^(.*[.!?][\"')]?) (.+)$", ctx)  # greedy: split after the last finished sentence
    if m is None:  # no finished sentence before the fragment: ctx_a is empty
        return "", ctx
    return m.group(1), m.group(2)


def read_hellaswag(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """HellaSwag rows in the ``Rowan/hellaswag`` schema from the 6-lines-per-item text dump.

    Lines per item: ``activity_label + ": " + ctx``, the gold index, then the four endings.
    """
    path = task_paths("hellaswag", data_dir)[0]
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ZeroShotDataError(
            f"{path} has {len(lines)} lines, not a multiple of 6 (context, gold, 4 endings per item). Fix: use the release dump."
        )
    out = []
    for i in range(0, len(lines), 6):
        head, gold, endings = lines[i], lines[i + 1].strip(), lines[i + 2 : i + 6]
        label, sep, ctx = head.partition(": ")
        if not sep:
            raise bad_item(path, i + 1, "expected 'activity: context'")
        check_label(gold, {g: g for g in "0123"}, path, i + 2)
        ctx_a, ctx_b = _split_context(ctx)
        out.append(
            {
                "ind": i // 6,
                "activity_label": label,
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": ctx,
                "endings": endings,
                "label": gold,  # a string, as on the hub: the stock template "{{label}}" renders it
            }
        )
    return out


def read_boolq(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """BoolQ rows ``{question, passage, idx, label}`` with label 1 = true, as in ``super_glue/boolq``."""
    path = task_paths("boolq", data_dir)[0]
    truth = {"True": 1, "true": 1, "1": 1, "False": 0, "false": 0, "0": 0}
    return [
        {"question": r["question"], "passage": r["passage"], "idx": int(r["idx"]), "label": check_label(r["label"], truth, path, n)}
        for n, r in _read_jsonl(path, ("question", "passage", "idx", "label"))
    ]


def parse_obqa_choices(text: str, labels: str = "ABCD") -> dict[str, list[str]]:
    """Split a release "(A) .. (B) .. (C) .. (D) .." string into ``{"text": [...], "label": [...]}``.

    Markers are searched in order, so a "(B)" inside an earlier option's text cannot split it.
    """
    starts = []
    pos = 0
    for lab in labels:
        marker = f"({lab}) "
        at = text.find(marker, pos)
        if at < 0:
            raise ValueError(f"choice marker {marker.strip()} not found in {text!r}")
        starts.append(at)
        pos = at + len(marker)
    texts = [text[a + 4 : b].strip() for a, b in zip(starts, starts[1:] + [len(text)])]
    return {"text": texts, "label": list(labels)}


def read_openbookqa(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """OpenBookQA rows in the ``allenai/openbookqa`` (main) schema from the release TSV."""
    path = task_paths("openbookqa", data_dir)[0]
    with open(path, encoding="utf-8") as f:
        # Plain tab split, not csv: the texts contain quote characters csv would interpret.
        rows = [(n, line.rstrip("\n").split("\t")) for n, line in enumerate(f, 1) if line.strip()]
    names = ("ID", "Question Stem", "Choices", "Answer Key")
    header = rows[0][1] if rows else []
    if not set(names) <= set(header):
        raise bad_item(path, 1, f"the header lacks {', '.join(k for k in names if k not in header)}")
    col = {name: header.index(name) for name in names}
    out = []
    for n, r in rows[1:]:
        if len(r) < len(header):
            raise bad_item(path, n, f"{len(r)} tab-separated fields, the header has {len(header)}")
        try:
            choices = parse_obqa_choices(r[col["Choices"]])
        except ValueError as e:
            raise bad_item(path, n, str(e)) from None
        answer = check_label(r[col["Answer Key"]], {k: k for k in choices["label"]}, path, n)
        out.append({"id": r[col["ID"]], "question_stem": r[col["Question Stem"]], "choices": choices, "answerKey": answer})
    return out


def read_lambada(data_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """LAMBADA rows ``{text}``; the task scores the last word given the rest."""
    return [{"text": r["text"]} for _, r in _read_jsonl(task_paths("lambada", data_dir)[0], ("text",))]


READERS: dict[str, Callable[[str | os.PathLike], list[dict[str, Any]]]] = {
    "piqa": read_piqa,
    "arc_easy": read_arc_easy,
    "arc_challenge": read_arc_challenge,
    "winogrande": read_winogrande,
    "hellaswag": read_hellaswag,
    "boolq": read_boolq,
    "openbookqa": read_openbookqa,
    "lambada": read_lambada,
}

# The split each stock task evaluates (lm-eval picks test, else validation); kept for fidelity.
SPLITS = {
    "piqa": "validation",
    "arc_easy": "test",
    "arc_challenge": "test",
    "winogrande": "validation",
    "hellaswag": "validation",
    "boolq": "validation",
    "openbookqa": "test",
    "lambada": "test",
}


# ------------------------------------------------------------------------------- lm-eval hooks
def _custom_dataset(task: str) -> Callable[..., datasets.DatasetDict]:
    """An lm-eval ``custom_dataset`` callable for ``task``; lm-eval calls it with the task metadata."""

    def load(**metadata: Any) -> datasets.DatasetDict:
        data_dir = metadata.get(DATA_DIR_KEY)
        if not data_dir:
            raise ValueError(
                f"no data directory for fl_{task}: lm-eval passed no '{DATA_DIR_KEY}' metadata. Fix: call "
                f"flatten_lightning.zeroshot.evaluate_zeroshot(..., data_dir=...), or run lm_eval with "
                f'--metadata \'{{"{DATA_DIR_KEY}": "/path/to/zeroshot"}}\'.'
            )
        missing = missing_files(task, data_dir)
        if missing:
            raise FileNotFoundError(f"fl_{task} needs: " + "; ".join(missing))
        return datasets.DatasetDict({SPLITS[task]: datasets.Dataset.from_list(READERS[task](data_dir))})

    load.__name__ = f"{task}_dataset"
    return load


piqa_dataset = _custom_dataset("piqa")
arc_easy_dataset = _custom_dataset("arc_easy")
arc_challenge_dataset = _custom_dataset("arc_challenge")
winogrande_dataset = _custom_dataset("winogrande")
hellaswag_dataset = _custom_dataset("hellaswag")
boolq_dataset = _custom_dataset("boolq")
openbookqa_dataset = _custom_dataset("openbookqa")
lambada_dataset = _custom_dataset("lambada")


def hellaswag_clean(text: str) -> str:
    """HellaSwag text cleaning as lm-eval's stock task does it.

    WikiHow texts carry bracketed markers: " [title]" ends a sentence, the other tags vanish, and the
    doubled spaces left behind are halved once.
    """
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_doc(doc: dict[str, Any]) -> dict[str, Any]:
    context = doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": hellaswag_clean(context),
        "choices": [hellaswag_clean(e) for e in doc["endings"]],
        "gold": int(doc["label"]),
    }


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Add the stock task's ``query``, ``choices`` and ``gold`` fields to ``Rowan/hellaswag``-schema rows."""
    return dataset.map(_hellaswag_doc)


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    """The gold option index: lm-eval's winogrande puts the options in the context (partial scoring)."""
    return int(doc["answer"]) - 1


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """The sentence up to the blank, filled with each option."""
    return list(doc["context_options"])


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    """The sentence after the blank, scored after each filled-in context."""
    return doc["continuation"].strip()
