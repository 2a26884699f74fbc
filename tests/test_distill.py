"""Distillation maths: group composition over stages, the hidden-state and logit losses, the block-output hooks."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatten_lightning.compress import Plan, Step
from flatten_lightning.distill import block_outputs, compose_groups, hidden_distillation, logit_distillation, teacher_blocks


def _plan(layers: int, *positions: int) -> Plan:
    return Plan(layers, [Step(p, [], 0.0, [], []) for p in positions])


def test_two_stages_compose_to_original_indices():
    first = _plan(6, 1)  # [0] [1 2] [3] [4] [5]
    second = _plan(5, 2)  # merges blocks 2 and 3 of the 5-block model: originals 3 and 4
    assert compose_groups([first, second], 6) == [[0], [1, 2], [3, 4], [5]]
    assert teacher_blocks(compose_groups([first, second], 6)) == [0, 2, 4, 5]
    # A second stage merging a merged block with its neighbour: its group holds three originals.
    assert compose_groups([first, _plan(5, 0)], 6) == [[0, 1, 2], [3], [4], [5]]


@pytest.mark.parametrize("positions", [(1, 2), (0, 0), (4, 1), (3, 3)])
def test_stages_compose_like_one_plan_with_all_steps(positions):
    """Stage k's positions index the model stage k-1 left, as the steps inside one plan do."""
    a, b = positions
    assert compose_groups([_plan(6, a), _plan(5, b)], 6) == _plan(6, a, b).groups


def test_without_plans_every_block_is_its_own_teacher():
    assert compose_groups([], 4) == [[0], [1], [2], [3]]
    assert teacher_blocks(compose_groups([], 4)) == [0, 1, 2, 3]


def test_a_stage_planned_on_another_depth_is_refused():
    with pytest.raises(ValueError, match="stage 2 was planned on 6 blocks, but the stages before it leave 5"):
        compose_groups([_plan(6, 1), _plan(6, 1)], 6)


def test_hidden_distillation_is_the_mean_relative_squared_error():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 3, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    assert hidden_distillation([x.clone() for x in t], t).item() == 0.0
    assert hidden_distillation([torch.zeros_like(x) for x in t], t).item() == pytest.approx(1.0, rel=1e-12)  # zeros: error = signal
    s = [t[0] + 0.5, 3 * t[1]]
    expected = (0.25 / t[0].square().mean() + 4 * t[1].square().mean() / t[1].square().mean()) / 2
    assert hidden_distillation(s, t).item() == pytest.approx(expected.item(), rel=1e-12)
    # Scale-free: scaling student and teacher together leaves it unchanged.
    assert hidden_distillation([10 * x for x in s], [10 * x for x in t]).item() == pytest.approx(expected.item(), rel=1e-12)


def test_token_normalisation_weighs_every_token_alike():
    t = torch.ones(1, 4, 2, dtype=torch.float64)
    t[0, 0] = 100.0  # a "massive activation" on the first token
    s = t.clone()
    s[0, 1:] = 0.0  # every ordinary token wrong (relative error 1), the massive one exact
    assert hidden_distillation([s], [t], "token").item() == pytest.approx(0.75, rel=1e-12)  # 3 of 4 tokens fully off
    assert hidden_distillation([s], [t], "global").item() == pytest.approx(3 / (100**2 + 3), rel=1e-12)  # almost nothing
    with pytest.raises(ValueError, match="unknown hidden-state normalisation 'l2'; choose one of global, token"):
        hidden_distillation([s], [t], "l2")


def test_hidden_distillation_compares_half_precision_in_float32():
    s = torch.randn(1, 2, 4, dtype=torch.bfloat16, requires_grad=True)
    loss = hidden_distillation([s], [torch.randn(1, 2, 4, dtype=torch.bfloat16)])
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_hidden_distillation_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="one teacher state per student block, got 1 and 2"):
        hidden_distillation([torch.zeros(1, 2, 4)], [torch.zeros(1, 2, 4)] * 2)
    with pytest.raises(ValueError, match=r"block 0: student hidden state \(1, 2, 4\) and teacher's \(1, 3, 4\) differ in shape"):
        hidden_distillation([torch.zeros(1, 2, 4)], [torch.zeros(1, 3, 4)])


def test_logit_distillation_is_tau_squared_kl_per_token():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    p, q = F.softmax(t / 2, -1), F.softmax(s / 2, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()  # per token, averaged over the 6 tokens
    assert logit_distillation(s, t, 2.0).item() == pytest.approx(4 * kl.item(), rel=1e-6)
    assert logit_distillation(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-7)


class _Pair(nn.Module):
    """A block that returns (hidden, extra) like older decoder layers."""

    def forward(self, x):
        return x * 2, None


def test_block_outputs_records_each_block_and_removes_its_hooks():
    blocks = nn.ModuleList([nn.Linear(4, 4), _Pair(), nn.Identity()])
    x = torch.randn(2, 4)
    with block_outputs(blocks) as outs:
        h = blocks[0](x)
        h2, _ = blocks[1](h)
        blocks[2](h2)
    assert torch.equal(outs[0], h) and torch.equal(outs[1], h2) and torch.equal(outs[2], h2)
    assert all(not b._forward_hooks for b in blocks)
