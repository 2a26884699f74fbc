"""Recovery text written by the dense model itself: each training window's first tokens, continued by sampling.

A user recovering a compressed model has the dense model, and the dense model can write text in its own
distribution: what it learned in pre-training, not only what the user's sample holds. Here every
``--seqlen``-token window of the training files (the Alpaca and C4 samples by default; never the evaluation
text) gives a prompt of its first ``--prompt-tokens`` tokens, and the dense model continues it to ``--seqlen``
tokens by sampling at ``--temperature`` within nucleus ``--top-p`` (1 and 1: its own next-token distribution;
the default 0.95 drops the least likely 5% of mass, the tail a 135M model drifts into nonsense from; end-of-text is suppressed so
every row is full length). Rows go to ``--out`` as JSON Lines ({"text": prompt + continuation}), a file
``recovery_unrelated.py --train-files`` reads; the file is written once, atomically, and never overwritten.

    .venv/bin/python benchmarks/teacher_text.py --out runs/teacher_text.jsonl [--samples 1024] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from recovery_unrelated import TRAIN_FILES, WIKITEXT, is_evaluation_text

from flatten_lightning.atomic import write_text_atomic
from flatten_lightning.data import read_text, tokenize
from flatten_lightning.sources import EMBEDDED_DEFAULT, load_model


def prompts(ids: torch.Tensor, seqlen: int, prompt_tokens: int, samples: int) -> torch.Tensor:
    """[n, prompt_tokens]: the first ``prompt_tokens`` of each non-overlapping ``seqlen`` window of ``ids`` [L],
    taken evenly through the text when there are more windows than ``samples`` (n = min(windows, samples))."""
    windows = len(ids) // seqlen
    if windows < 1:
        raise ValueError(
            f"the training text has {len(ids)} tokens, less than one window of {seqlen}. Fix: more text or a shorter --seqlen."
        )
    starts = torch.linspace(0, windows - 1, min(windows, samples)).round().long() * seqlen
    return torch.stack([ids[s : s + prompt_tokens] for s in starts.tolist()])


@torch.no_grad()
def continue_prompts(
    model, prompt_ids: torch.Tensor, new_tokens: int, temperature: float, top_p: float, batch_size: int, seed: int
) -> torch.Tensor:
    """[n, prompt_tokens + new_tokens]: each prompt continued by sampling ``new_tokens`` tokens (no early end)."""
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[i : i + batch_size]
        out.append(
            model.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=top_p,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id,
            )
        )
        print(f"  {i + len(batch)}/{len(prompt_ids)} rows", flush=True)
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=EMBEDDED_DEFAULT, help="the dense model that writes the text")
    ap.add_argument(
        "--prompt-files", nargs="+", default=list(TRAIN_FILES), help="text whose windows give the prompts (never the evaluation text)"
    )
    ap.add_argument("--samples", type=int, default=1024, help="rows to write")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per row, prompt included")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1: the whole distribution)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", required=True, help="a .jsonl file that does not exist yet")
    args = ap.parse_args()
    if not args.out.endswith(".jsonl"):
        ap.error(f"--out {args.out} must end in .jsonl (recovery_unrelated.py --train-files reads rows of that format)")
    if os.path.exists(args.out):
        ap.error(f"--out {args.out} exists; this script does not overwrite. Fix: another path, or remove it yourself.")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        ap.error(f"the directory of --out {args.out} does not exist. Fix: create it first.")
    if (
        not 0 < args.prompt_tokens < args.seqlen
        or args.samples < 1
        or args.temperature <= 0
        or args.batch_size < 1
        or not 0 < args.top_p <= 1
    ):
        ap.error("need 0 < --prompt-tokens < --seqlen, --samples >= 1, --temperature > 0, 0 < --top-p <= 1 and --batch-size >= 1")
    if is_evaluation_text(args.prompt_files):
        ap.error(f"{WIKITEXT} is the evaluation text: the prompts must come from other text")
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load_model(args.source)
    ids = tokenize(tok, "\n\n".join(read_text(f) for f in args.prompt_files))
    p = prompts(ids, args.seqlen, args.prompt_tokens, args.samples)
    t0 = time.perf_counter()
    rows = continue_prompts(model, p, args.seqlen - args.prompt_tokens, args.temperature, args.top_p, args.batch_size, args.seed)
    seconds = time.perf_counter() - t0
    text = "".join(json.dumps({"text": tok.decode(r, skip_special_tokens=True)}) + "\n" for r in rows)
    write_text_atomic(args.out, text)
    print(f"wrote {len(rows)} rows of {rows.shape[1]} tokens ({rows.numel() - p.numel()} sampled) to {args.out} in {seconds:.0f}s")


if __name__ == "__main__":
    main()
