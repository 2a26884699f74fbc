"""The evaluator follows the protocol: non-overlapping windows, mean NLL over predicted tokens."""

import math

import pytest
import torch
from conftest import make_tiny

from flatten_lightning.perplexity import perplexity


def test_matches_plain_loop_and_counts():
    model = make_tiny("llama")
    ids = torch.randint(0, 97, (1000,), generator=torch.Generator().manual_seed(0))
    r = perplexity(model, ids, seqlen=128, batch_size=3, progress=False)
    assert r.n_windows == 1000 // 128 == 7 and r.n_tokens == 7 * 127
    nll, count = 0.0, 0
    for i in range(7):  # plain loop, one window at a time
        x = ids[i * 128 : (i + 1) * 128][None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
        nll -= logp.gather(1, x[0, 1:, None]).sum().item()
        count += 127
    assert r.ppl == pytest.approx(math.exp(nll / count), rel=1e-9)
    capped = perplexity(model, ids, seqlen=128, max_windows=2, progress=False)
    assert capped.n_windows == 2 and capped.n_tokens == 254


def test_too_short_text():
    with pytest.raises(ValueError, match="fewer than one window of 2048"):
        perplexity(make_tiny("llama"), torch.arange(100), 2048, progress=False)
