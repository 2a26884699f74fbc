"""flatten_lightning.schedule: the learning-rate factor f(s) of recovery training."""

import math

import pytest

from flatten_lightning.schedule import lr_factor


def test_warmup_rises_linearly_to_one_then_the_schedule_starts():
    assert [lr_factor(s, 10, warmup=3) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(3, 10, warmup=3, schedule="cosine") == 1.0  # p = 0 at the first step after warmup


def test_cosine_halves_at_midpoint_and_reaches_zero_at_the_last_step():
    total, warmup = 12, 2
    f = [lr_factor(s, total, warmup, "cosine") for s in range(warmup, total + 3)]
    assert f[0] == 1.0 and lr_factor(7, total, warmup, "cosine") == pytest.approx(0.5)
    assert lr_factor(total, total, warmup, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(f, f[1:]))  # never rises, and stays at 0 past the end
    assert lr_factor(5, total, warmup, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 10)))


def test_constant_is_one_after_warmup():
    assert {lr_factor(s, 5) for s in range(20)} == {1.0}


@pytest.mark.parametrize(
    "schedule, warmup, msg", [("linear", 0, "not one of constant, cosine"), ("cosine", -1, "warmup_steps must be >= 0")]
)
def test_bad_schedule_is_refused(schedule, warmup, msg):
    with pytest.raises(ValueError, match=msg):
        lr_factor(0, 10, warmup, schedule)
