"""benchmarks/position_profile.py: per-position NLLs average to the library's perplexity; ratios per bucket."""

import math
import os
import sys

import torch
from lightning_helpers import tiny_model_dir

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))  # the script imports its siblings
import position_profile  # noqa: E402

from flatten_lightning.perplexity import perplexity  # noqa: E402


def test_position_nlls_average_to_the_protocols_perplexity(tmp_path):
    from flatten_lightning.sources import load_model

    model, _ = load_model(str(tiny_model_dir(tmp_path / "m")))
    ids = torch.randint(0, model.config.vocab_size, (3 * 16 + 5,), generator=torch.Generator().manual_seed(0))
    nll = position_profile.position_nlls(model, ids, 16, 3)
    assert nll.shape == (15,)  # one value per predicted position
    whole = perplexity(model, ids, 16, 3, progress=False)  # every window predicts the same 15 positions
    assert math.isclose(nll.mean().item(), whole.nll, rel_tol=1e-9)
    first = position_profile.position_nlls(model, ids, 16, 1)
    assert not torch.allclose(first, nll)  # the average is over the windows, not the first one alone


def test_bucket_ratios_are_exp_of_the_mean_gap_per_run_of_positions():
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    nll = torch.tensor([1.5, 2.5, 3.0, 5.0, 7.0], dtype=torch.float64)
    r = position_profile.bucket_ratios(nll, ref, 2)
    assert [round(x, 12) for x in r] == [
        round(math.exp(0.5), 12),
        round(math.exp(0.5), 12),
        round(math.exp(2.0), 12),
    ]  # the last run holds one
