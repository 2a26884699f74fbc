"""benchmarks/heldout_spread.py: per-window NLLs add up to the library's perplexity, and the per-set ratios."""

import argparse
import math
import os
import sys

import pytest
import torch
from lightning_helpers import tiny_model_dir

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))  # the script imports its siblings
import heldout_spread  # noqa: E402

from flatten_lightning.data import held_out_ids, read_text  # noqa: E402
from flatten_lightning.perplexity import perplexity  # noqa: E402


def test_window_nlls_average_to_the_protocols_perplexity(tmp_path):
    from flatten_lightning.sources import load_model

    model, _ = load_model(str(tiny_model_dir(tmp_path / "m")))
    ids = torch.randint(0, model.config.vocab_size, (5 * 16 + 7,), generator=torch.Generator().manual_seed(0))
    nll = heldout_spread.window_nlls(model, ids, 16, 4)
    assert len(nll) == 4 and len(set(nll)) == 4  # one value per window, each its own
    whole = perplexity(model, ids, 16, 4, progress=False)
    assert math.isclose(math.exp(sum(nll) / 4), whole.ppl, rel_tol=1e-9)  # every window predicts 15 tokens


def test_group_ratios_are_exp_of_the_mean_nll_gap_per_set():
    ref = [1.0, 2.0, 3.0, 4.0, 5.0]
    nll = [1.5, 2.5, 3.0, 5.0, 9.0]
    r = heldout_spread.group_ratios(nll, ref, 2)  # the fifth window makes no whole set of two: left out
    assert [round(x, 12) for x in r] == [round(math.exp(0.5), 12), round(math.exp(0.5), 12)]
    assert heldout_spread.group_ratios(nll, ref, 5) == [math.exp(sum(nll) / 5 - sum(ref) / 5)]


def test_score_on_held_out_scores_every_model_on_the_same_tokens(tmp_path):
    from flatten_lightning.sources import load_model

    d = str(tiny_model_dir(tmp_path / "m"))
    args = argparse.Namespace(models=[d, d + "/"], calib_tokens=64, start="article", windows=2, seqlen=16)
    got = heldout_spread.score_on_held_out(args, lambda model, ids: ids[:8].tolist())
    _, tok = load_model(d)
    want = held_out_ids(tok, read_text(heldout_spread.WIKITEXT), 64, "article")[:8].tolist()
    assert got == {d: want, d + "/": want}  # one entry per source, each scored on the article-start tokens
    args.windows = 10**6
    with pytest.raises(SystemExit, match="held-out windows. Fix: pass fewer --windows"):
        heldout_spread.score_on_held_out(args, lambda model, ids: None)
