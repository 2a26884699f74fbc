"""benchmarks/candidate_proxies.py: the agreement count and the instrumented default's records."""

import os
import sys

import pytest
import torch
from conftest import make_tiny

import flatten_lightning.compress as compress
from flatten_lightning.compress import CompressConfig, flatten_gpt

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))  # the script imports its siblings
import candidate_proxies  # noqa: E402


def test_agreement_counts_the_steps_a_score_picks_the_trials_pair_and_sums_its_regret():
    records = [  # two steps of two candidates; the score agrees at step 1 only
        {"size": 2, "score": 0.1, "final": 0.02},
        {"size": 2, "score": 0.2, "final": 0.01},
        {"size": 2, "score": 0.3, "final": 0.05},
        {"size": 3, "score": 0.4, "final": 0.06},
    ]
    hits, regret = candidate_proxies.agreement(records, [2, 2])["score"]
    assert hits == 1 and regret == pytest.approx(0.02 / 0.01 - 1)
    hits, regret = candidate_proxies.agreement(records, [1, 3])["score"]  # steps of unequal size: both agree
    assert hits == 2 and regret == 0.0


def test_records_follow_the_candidates_the_default_tried(calib_ids, monkeypatch):
    """One record per tried candidate, in order, whose final error is the one the plan stores for it."""
    for name in ("flatten_blocks", "fit_block", "final_error"):  # restored after the test
        monkeypatch.setattr(compress, name, getattr(compress, name))
    records: list[dict] = []
    candidate_proxies.instrument(records)
    plan = flatten_gpt(make_tiny("llama"), calib_ids, CompressConfig(3, candidates=2), progress=False)
    tried = [err for step in plan.steps for _, err in step.candidates]
    assert [r["final"] for r in records] == pytest.approx(tried)
    assert all(r["parallel"] > 0 and 0 <= r["similarity"] <= 2 and r["fitted"] >= 0 for r in records)
    assert torch.isfinite(torch.tensor([v for r in records for v in r.values()])).all()
