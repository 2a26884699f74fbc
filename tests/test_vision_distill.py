"""Feature distillation losses: known values on constructed tokens, gradients reach the student only."""

import math

import pytest
import torch

from flatten_lightning.vision.distill import feature_distillation


def test_losses_have_their_defining_values():
    t = torch.randn(2, 3, 4, dtype=torch.float64)
    assert feature_distillation(t.clone(), t, "mse").item() == 0.0
    assert math.isclose(feature_distillation(t + 0.5, t, "mse").item(), 0.25, rel_tol=1e-12)
    assert abs(feature_distillation(3 * t, t, "cosine").item()) < 1e-12  # direction only
    assert math.isclose(feature_distillation(-t, t, "cosine").item(), 2.0, rel_tol=1e-12)


def test_gradient_flows_to_the_student_in_float32_for_half_inputs():
    s = torch.randn(1, 2, 4, dtype=torch.bfloat16, requires_grad=True)
    loss = feature_distillation(s, torch.randn(1, 2, 4, dtype=torch.bfloat16), "cosine")
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="differ in shape"):
        feature_distillation(torch.zeros(1, 2, 4), torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="unknown distillation loss 'kl'"):
        feature_distillation(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), "kl")
