"""Does a compressed model's quality carry over to text unlike its calibration text?

Held-out perplexity (library protocol, non-overlapping windows) of each model on three texts: WikiText-2
validation after the calibration tokens, and the last tokens of the C4 and Alpaca samples (never used for
calibration here). A model whose least-squares corrections specialised to WikiText is much nearer dense
on the first than on the other two.

    .venv/bin/python benchmarks/text_transfer.py smollm2 runs/quality/smollm2/flatten runs/quality/smollm2/shortgpt
"""

from __future__ import annotations

import argparse

import torch
from ablate import TEXTS  # the same three files the ablations calibrate on

from flatten_lightning.data import held_out, read_text, tokenize
from flatten_lightning.perplexity import perplexity
from flatten_lightning.sources import load_model


def texts_ids(tokenizer, tokens: int, calib_tokens: int) -> dict[str, torch.Tensor]:
    """The evaluation tokens of each text: WikiText after the calibration tokens, the others' last ``tokens``."""
    ids = {name: tokenize(tokenizer, read_text(path)) for name, path in TEXTS.items()}
    out = {"wikitext": held_out(ids.pop("wikitext"), 1, calib_tokens)[:tokens]}
    return out | {name: t[-tokens:] for name, t in ids.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model sources (the first is the reference, e.g. the dense one)")
    ap.add_argument("--tokens", type=int, default=8 * 1024, help="evaluation tokens per text")
    ap.add_argument("--seqlen", type=int, default=1024, help="tokens per window")
    ap.add_argument("--calib-tokens", type=int, default=32 * 512, help="WikiText tokens used for calibration (skipped)")
    args = ap.parse_args()
    rows, ids = [], None
    for source in args.models:
        model, tok = load_model(source)
        ids = ids or texts_ids(tok, args.tokens, args.calib_tokens)
        rows.append((source, {name: perplexity(model, t, args.seqlen, None, progress=False).ppl for name, t in ids.items()}))
        del model
    ref = rows[0][1]
    print("| model | " + " | ".join(f"{n} ppl (/ {rows[0][0]})" for n in TEXTS) + " |")
    print("|---|" + "---|" * len(TEXTS))
    for source, ppl in rows:
        print(f"| {source} | " + " | ".join(f"{ppl[n]:.2f} ({ppl[n] / ref[n]:.2f}x)" for n in TEXTS) + " |")


if __name__ == "__main__":
    main()
