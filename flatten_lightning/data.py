"""Text sources and token windows for calibration and held-out evaluation.

A text file is read whole (WikiText-2 style); ``.jsonl`` takes each row's "text" and ``.json``
(Alpaca) each row's instruction/input/output, joined with "\\n\\n" as the WikiText protocol joins
rows. Calibration takes the first ``n`` non-overlapping windows (of several files: in turn, each from its
own start); held-out evaluation starts after them, so the two never share a token. They may share an
article, though: ``first_article_after`` finds where WikiText text stops sharing one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase


class TextFileError(ValueError):
    """A text input that cannot be read as what its extension says; names the file (and line)."""


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """``(line number, row)`` for every non-blank line of a JSON Lines file, each row an object holding ``required``.

    A malformed line or a row without a required key is a ``TextFileError`` naming the file and line.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TextFileError(f"{path} line {n}: not valid JSON ({e.msg}). Fix: one JSON object per line.") from None
                if not isinstance(row, dict):
                    raise TextFileError(f"{path} line {n}: a JSON {type(row).__name__}, not an object. Fix: one JSON object per line.")
                absent = [k for k in required if k not in row]
                if absent:
                    raise TextFileError(f"{path} line {n}: no {', '.join(repr(k) for k in absent)} key. Fix: give every row {required}.")
                rows.append((n, row))
        except UnicodeDecodeError as e:
            raise _undecodable(path, e) from None
    return rows


def _undecodable(path: str | os.PathLike, e: UnicodeDecodeError) -> TextFileError:
    return TextFileError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}). Fix: convert it to UTF-8, or pass a text file.")


def _alpaca_text(path: str, rows: object) -> str:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise TextFileError(f"{path} is not a list of Alpaca rows. Fix: a .json file must be [{{'instruction', 'input', 'output'}}, ...].")
    fields = ("instruction", "input", "output")
    for i, r in enumerate(rows):
        if not any(isinstance(r.get(k), str) for k in fields) or any(k in r and not isinstance(r[k], str) for k in fields):
            raise TextFileError(
                f"{path} row {i}: needs string 'instruction'/'input'/'output' fields. Fix: a .json file must hold Alpaca rows."
            )
    return "\n\n".join("\n".join(p for p in (r.get("instruction", ""), r.get("input", ""), r.get("output", "")) if p) for r in rows)


def read_text(path: str) -> str:
    """The text of a local file (.txt read whole; .jsonl "text" fields; .json Alpaca rows).

    Every problem (missing file, bad JSON, missing field, not UTF-8) is an error naming the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path} does not exist. Fix: pass an existing .txt, .jsonl or .json file.")
    if path.endswith(".jsonl"):
        rows = read_jsonl(path, required=("text",))
        bad = next((n for n, r in rows if not isinstance(r["text"], str)), None)
        if bad is not None:
            raise TextFileError(f"{path} line {bad}: 'text' is not a string. Fix: give every row a string 'text'.")
        return "\n\n".join(r["text"] for _, r in rows)
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except UnicodeDecodeError as e:
        raise _undecodable(path, e) from None
    if path.endswith(".json"):
        try:
            rows = json.loads(raw)
        except json.JSONDecodeError as e:
            raise TextFileError(
                f"{path} line {e.lineno}: not valid JSON ({e.msg}). Fix: a .json file must be a list of Alpaca rows."
            ) from None
        return _alpaca_text(path, rows)
    return raw


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of ids, tokenized once."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_windows(ids: torch.Tensor, n: int, seqlen: int, source: str = "the calibration text") -> torch.Tensor:
    """The first ``n`` non-overlapping windows of ``seqlen`` tokens: [n, seqlen]."""
    if n < 1 or seqlen < 2:
        raise ValueError(f"need at least one calibration window of >= 2 tokens, got n={n}, seqlen={seqlen}")
    if ids.numel() < n * seqlen:
        raise ValueError(
            f"{source} has {ids.numel()} tokens, fewer than the {n} x {seqlen} = {n * seqlen} needed for "
            f"the requested calibration windows. Fix: lower --calib-samples or --calib-seqlen, or use a longer text."
        )
    return ids[: n * seqlen].view(n, seqlen).clone()


def check_distinct(paths: Sequence[str]) -> None:
    """Refuse a calibration file listed twice: each would give its first windows again (duplicate windows)."""
    seen: dict[str, str] = {}
    for p in paths:
        key = os.path.realpath(p)
        if key in seen:
            raise ValueError(f"calibration file {p} is listed twice (as {seen[key]}). Fix: list each file once.")
        seen[key] = p


def calibration_shares(n: int, k: int) -> list[int]:
    """Windows each of ``k`` sources gives to ``n`` interleaved windows: ``n // k`` each, the first ``n % k`` one more."""
    if n < k:
        raise ValueError(f"{k} calibration files need at least {k} windows, got {n}. Fix: raise --calib-samples or pass fewer files.")
    return [(n - i + k - 1) // k for i in range(k)]


def interleaved_windows(streams: Sequence[torch.Tensor], n: int, seqlen: int, sources: Sequence[str]) -> torch.Tensor:
    """[n, seqlen] calibration windows taken in turn from ``k`` token streams: window j comes from stream j mod k.

    Stream i gives its first ``calibration_shares(n, k)[i]`` windows (``calibration_windows``), so its held-out
    tokens start after them. Interleaving keeps every prefix of the windows (the scoring windows, a rank's
    shard) a mix of every source. One stream: exactly ``calibration_windows``.
    """
    shares = calibration_shares(n, len(streams))
    parts = [calibration_windows(ids, m, seqlen, src) for ids, m, src in zip(streams, shares, sources, strict=True)]
    return torch.stack([p[j] for j in range(shares[0]) for p in parts if j < len(p)])


def held_out(ids: torch.Tensor, n_calib: int, calib_seqlen: int) -> torch.Tensor:
    """The tokens after the calibration windows (for evaluation on unseen text)."""
    return ids[n_calib * calib_seqlen :]


# WikiText's article heading: a line " = Title = " (its sections are " = = Section = = ", with no title between).
_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $", re.MULTILINE)


def article_starts(text: str) -> list[int]:
    """Character offsets where WikiText's articles begin (their " = Title = " lines), ascending."""
    return [m.start() for m in _ARTICLE_HEADING.finditer(text)]


def first_article_after(tokenizer: PreTrainedTokenizerBase, text: str, n_tokens: int) -> int:
    """Character offset of the first article of ``text`` that begins after its first ``n_tokens`` tokens.

    ``held_out`` starts at token ``n_tokens``, mid-article: its first windows continue the article the
    calibration windows end in. Text from this offset shares no article with them. The first article start s
    with len(tokenize(text[:s])) >= n_tokens (a cut at a line start tokenizes the prefix as the whole text
    does), by doubling then bisecting, so no prefix tokenized is much longer than twice the one needed.
    """
    starts = article_starts(text)
    if not starts:
        raise ValueError("the text has no WikiText article heading (a line ' = Title = '). Fix: use WikiText-format text.")

    def enough(i: int) -> bool:
        return tokenize(tokenizer, text[: starts[i]]).numel() >= n_tokens

    lo, hi = 0, 1  # invariant: every start before lo is too early; starts[hi] (if any) is late enough
    while hi < len(starts) and not enough(hi):
        lo, hi = hi + 1, 2 * hi
    hi = min(hi, len(starts))
    while lo < hi:
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid + 1
    if lo == len(starts):
        raise ValueError(
            f"no article begins after the first {n_tokens} tokens of the text. Fix: use fewer calibration tokens or a longer text."
        )
    return starts[lo]


HELD_OUT_STARTS = ("tokens", "article")  # where held-out text starts: right after the calibration tokens, or the next article


def held_out_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, calib_tokens: int, start: str = "tokens", ids: torch.Tensor | None = None
) -> torch.Tensor:
    """The held-out tokens of ``text`` (1-D): after its first ``calib_tokens`` (``start`` "tokens": ``held_out``) or from
    the first article that begins after them ("article": ``first_article_after``, no article shared with calibration).
    ``ids``: ``text`` already tokenized, reused by "tokens" instead of tokenizing it again."""
    if start not in HELD_OUT_STARTS:
        raise ValueError(f"held-out start must be one of {HELD_OUT_STARTS}, got {start!r}")
    if start == "tokens":
        return held_out(tokenize(tokenizer, text) if ids is None else ids, 1, calib_tokens)
    return tokenize(tokenizer, text[first_article_after(tokenizer, text, calib_tokens) :])
