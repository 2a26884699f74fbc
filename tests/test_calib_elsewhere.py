"""benchmarks/calib_elsewhere.py: calibration windows spread evenly over a text."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))  # the script imports its siblings
import calib_elsewhere  # noqa: E402


def test_spread_windows_start_evenly_from_the_first_token_to_near_the_end():
    w = calib_elsewhere.spread_windows(torch.arange(100), 4, 10)
    assert w.shape == (4, 10)
    assert [r[0].item() for r in w] == [0, 30, 60, 90]  # step (100 - 10) // 3
    assert torch.equal(w[3], torch.arange(90, 100))  # the last window ends at the text's end; each is contiguous


def test_spread_windows_refuse_too_short_a_text():
    with pytest.raises(ValueError, match="need n >= 2 windows of 10 within 30 tokens, got n=4"):
        calib_elsewhere.spread_windows(torch.arange(30), 4, 10)
