"""Calibration runner pieces: the input cache returns exactly the prefix's output, with fewer block runs."""

import pytest
import torch
from conftest import make_tiny

from flatten_lightning.calibrate import BlockRunner, InputCache, io_similarities


class _Counting(BlockRunner):
    """A BlockRunner that counts block runs."""

    runs = 0

    def run_block(self, *args, **kw):
        self.runs += 1
        return super().run_block(*args, **kw)


@pytest.mark.parametrize("stride", [0, 1, 2, 4])
def test_input_of_equals_the_prefix_run_with_at_most_stride_minus_one_blocks(calib_ids, stride):
    model = make_tiny("llama", num_hidden_layers=6)
    blocks = list(model.model.layers)
    runner = _Counting(model, "cpu")
    cache = InputCache(runner, runner.embed(calib_ids), stride)
    io_similarities(runner, cache.embeddings, blocks, cache=cache)
    assert sorted(cache.saved) == ([0] if stride == 0 else list(range(0, 6, stride)))
    for k in range(6):
        runner.runs = 0
        got = cache.input_of(blocks, k)
        assert runner.runs == (k if stride == 0 else k % stride)
        want = runner.run_blocks(blocks[:k], cache.embeddings)
        assert torch.equal(got, want)


def test_input_of_keeps_the_stride_inputs_it_passes(calib_ids):
    """After a merge truncates the cache, reaching a deep block keeps the stride positions on the way for the next one."""
    model = make_tiny("llama", num_hidden_layers=6)
    blocks = list(model.model.layers)
    runner = _Counting(model, "cpu")
    cache = InputCache(runner, runner.embed(calib_ids), 2)
    got = cache.input_of(blocks, 5)
    assert sorted(cache.saved) == [0, 2, 4]
    assert torch.equal(cache.saved[4], runner.run_blocks(blocks[:4], cache.embeddings))
    runner.runs = 0
    assert torch.equal(cache.input_of(blocks, 5), got) and runner.runs == 1  # from position 4, not from 0


def test_truncate_forgets_inputs_after_a_merge(calib_ids):
    model = make_tiny("llama", num_hidden_layers=6)
    blocks = list(model.model.layers)
    runner = BlockRunner(model, "cpu")
    cache = InputCache(runner, runner.embed(calib_ids), 2)
    io_similarities(runner, cache.embeddings, blocks, cache=cache)
    h2 = cache.saved[2]
    cache.truncate(2)  # a merge at position 2: its input stays, later ones change
    assert sorted(cache.saved) == [0, 2] and cache.saved[2] is h2
    blocks[2:4] = [blocks[3]]  # any change of the blocks from 2 on
    io_similarities(runner, h2, blocks[2:], start=2, cache=cache)
    assert sorted(cache.saved) == [0, 2, 4]
    assert torch.equal(cache.input_of(blocks, 4), runner.run_blocks(blocks[:4], cache.embeddings))


def test_merged_keeps_the_stale_inputs_after_the_pair_renumbered(calib_ids):
    """Fast mode: a merge of blocks 2, 3 keeps inputs 0..2, drops 3 (inside the pair) and 4 (the pair's output,
    offered fresh by the next pass as position 3) and keeps 5 as position 4 (stale: computed before the merge)."""
    model = make_tiny("llama", num_hidden_layers=6)
    runner = BlockRunner(model, "cpu")
    cache = InputCache(runner, runner.embed(calib_ids), 1)
    io_similarities(runner, cache.embeddings, list(model.model.layers), cache=cache)
    before = dict(cache.saved)
    cache.merged(2)
    assert sorted(before) == [0, 1, 2, 3, 4, 5]
    assert sorted(cache.saved) == [0, 1, 2, 4] and all(cache.saved[p] is before[p] for p in (0, 1, 2))
    assert cache.saved[4] is before[5]


def test_auto_stride_and_bad_stride(calib_ids):
    assert [InputCache.auto_stride(d) for d in (1, 4, 5, 30, 32, 80)] == [1, 2, 3, 6, 6, 9]
    model = make_tiny("llama")
    with pytest.raises(ValueError, match="input stride must be >= 0"):
        InputCache(BlockRunner(model, "cpu"), torch.zeros(1, 2, 48), -1)


@pytest.mark.parametrize("k", [0, 2])
def test_parallel_error_is_near_the_flattened_blocks_error_and_zero_for_an_identity_block(calib_ids, k):
    """e ~ ||pair(h0) - flat(h0)||^2 / ||pair(h0)||^2 with flat the real flattened block (flatten_blocks); it
    differs only by the MLPs seeing each other's attention output. A second block that adds nothing
    (zero output projections) cannot be hurt by flattening: e = 0."""
    from flatten_lightning.calibrate import parallel_error
    from flatten_lightning.flatten import flatten_blocks

    model = make_tiny("llama")
    runner = BlockRunner(model, "cpu")
    blocks = list(runner.adapter.blocks())
    h0 = runner.run_blocks(blocks[:k], runner.embed(calib_ids))
    h1 = runner.run_block(blocks[k], h0)
    h2 = runner.run_block(blocks[k + 1], h1)
    flat = runner.run_block(flatten_blocks(runner.adapter, blocks[k : k + 2]), h0)
    real = ((h2 - flat).double().square().sum() / h2.double().square().sum()).item()
    assert real > 1e-3  # the pair is far from parallel: a wrong formula would show
    assert parallel_error(runner, blocks[k + 1], h0, h1, h2) == pytest.approx(real, rel=0.05)
    # Under DDP the two sums are reduced: doubling both leaves the ratio.
    assert parallel_error(runner, blocks[k + 1], h0, h1, h2, lambda t: 2 * t) == pytest.approx(
        parallel_error(runner, blocks[k + 1], h0, h1, h2), rel=1e-12
    )
    second = blocks[k + 1]
    with torch.no_grad():
        runner.adapter.o_module(second).weight.zero_()
        runner.adapter.down_module(second).weight.zero_()
    assert parallel_error(runner, second, h0, h1, runner.run_block(second, h1)) == pytest.approx(0.0, abs=1e-12)


def test_input_of_first_rows_runs_only_those_and_keeps_nothing(calib_ids):
    """A scoring pass that needs a few windows runs the blocks on those alone; the cache keeps whole inputs only."""
    model = make_tiny("llama", num_hidden_layers=6)
    runner = BlockRunner(model, "cpu")
    blocks = list(model.model.layers)
    cache = InputCache(runner, runner.embed(calib_ids), 2)
    rows = cache.input_of(blocks, 3, rows=2)
    assert rows.shape[0] == 2 and sorted(cache.saved) == [0]
    assert torch.allclose(rows, cache.input_of(blocks, 3)[:2], rtol=1e-6, atol=1e-6) and sorted(cache.saved) == [0, 2]
