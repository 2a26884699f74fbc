"""The compression loop on tiny models: depth, plan, determinism, rebuild from plan, errors."""

import pytest
import torch
from conftest import KINDS, make_tiny

from flatten_lightning import prune
from flatten_lightning.adapters import get_adapter
from flatten_lightning.calibrate import NonFiniteActivationError
from flatten_lightning.compress import CompressConfig, Plan, flatten_gpt, holdout_rows, rebuild_structure


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_compresses_to_target_with_consistent_model(tiny, calib_ids):
    n = tiny.config.num_hidden_layers
    plan = flatten_gpt(tiny, calib_ids, CompressConfig(3), progress=False)
    assert tiny.config.num_hidden_layers == len(tiny.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in tiny.model.layers] == [0, 1, 2]
    assert sorted(i for g in plan.groups for i in g) == list(range(n))
    assert all(g == sorted(g) and g == list(range(g[0], g[-1] + 1)) for g in plan.groups)  # contiguous
    assert len(plan.steps) == n - 3
    layer_types = getattr(tiny.config, "layer_types", None)
    if layer_types is not None:
        assert len(layer_types) == 3
    # Every block has the original width again.
    assert get_adapter(tiny).is_plain()
    assert torch.isfinite(_logits(tiny, calib_ids[:2])).all()


def test_greedy_choice_follows_similarity(calib_ids):
    model = make_tiny("llama")
    plan = flatten_gpt(model, calib_ids, CompressConfig(5, candidates=1), progress=False)
    sims = plan.initial_similarities[:-1]
    assert plan.steps[0].position == max(range(len(sims)), key=sims.__getitem__)
    assert plan.steps[0].similarity == pytest.approx(max(sims))


def test_max_group_size_is_respected(calib_ids):
    model = make_tiny("llama", num_hidden_layers=6)
    plan = flatten_gpt(model, calib_ids, CompressConfig(3, max_group_size=2), progress=False)
    assert max(len(g) for g in plan.groups) == 2


def test_deterministic(calib_ids):
    a, b = make_tiny("qwen2"), make_tiny("qwen2")
    pa = flatten_gpt(a, calib_ids, CompressConfig(4), progress=False)
    pb = flatten_gpt(b, calib_ids, CompressConfig(4), progress=False)
    assert pa.to_dict()["groups"] == pb.to_dict()["groups"]
    assert torch.equal(_logits(a, calib_ids[:1]), _logits(b, calib_ids[:1]))


@pytest.mark.parametrize("stride", [0, 1])
def test_input_cache_changes_nothing(calib_ids, stride):
    # The default stride keeps inputs of positions 0, 3 (6 blocks); 0 re-runs every prefix, 1 keeps all.
    a, b = make_tiny("llama"), make_tiny("llama")
    pa = flatten_gpt(a, calib_ids, CompressConfig(3), progress=False)
    pb = flatten_gpt(b, calib_ids, CompressConfig(3, input_stride=stride), progress=False)
    assert [s.position for s in pa.steps] == [s.position for s in pb.steps]
    assert pa.groups == pb.groups and [s.kept_channels for s in pa.steps] == [s.kept_channels for s in pb.steps]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_sequential_target_beats_flattened_target_on_calibration(calib_ids):
    """The sequential correction reproduces the dense model's logits better (docs/DESIGN.md 1.3)."""
    dense = make_tiny("llama")
    ref = _logits(dense, calib_ids)
    errs = {}
    for corr in ("sequential", "flattened"):
        m = make_tiny("llama")
        flatten_gpt(m, calib_ids, CompressConfig(4, correction=corr, feedback=0.0), progress=False)
        errs[corr] = (_logits(m, calib_ids) - ref).pow(2).mean().item()
    assert errs["sequential"] < errs["flattened"], errs


@pytest.mark.parametrize("kind", KINDS)
def test_rebuild_structure_from_plan_round_trips(kind, calib_ids):
    model = make_tiny(kind)
    plan = flatten_gpt(model, calib_ids, CompressConfig(3), progress=False)
    fresh = make_tiny(kind, seed=123)  # different weights, same dense structure
    rebuild_structure(fresh, Plan.from_dict(plan.to_dict()))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(_logits(fresh, calib_ids[:2]), _logits(model, calib_ids[:2]))


def test_rebuild_structure_refuses_mismatched_model(calib_ids):
    plan = flatten_gpt(make_tiny("llama"), calib_ids, CompressConfig(4), progress=False)
    with pytest.raises(ValueError, match="plan was made for a model of 6 layers but this model has 5"):
        rebuild_structure(make_tiny("llama", num_hidden_layers=5), plan)


@pytest.mark.parametrize("target", [6, 7, 0, -1])
def test_impossible_target_depth(calib_ids, target):
    with pytest.raises(ValueError, match=f"target depth {target} is impossible for a model of 6 layers"):
        flatten_gpt(make_tiny("llama"), calib_ids, CompressConfig(target), progress=False)


def test_nan_in_calibration_activations(calib_ids):
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="NaN/inf at the output of block 2"):
        flatten_gpt(model, calib_ids, CompressConfig(4), progress=False)


def _weights_equal(a, b, atol=1e-10):
    return all(torch.allclose(x, y, atol=atol) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "phi3"])
def test_feedback_and_refit_change_nothing_after_one_merge(kind, calib_ids):
    """One merge: its input is the dense one, so the sequential target IS the dense hidden state (feedback
    adds nothing) and the final model's input to the merged block is the one it was fitted on (a refit pass
    reproduces the same weights). The refit's ridge prior is the fitted block, not the flattened one, so
    the fits are compared nearly unregularised (fit_ridge 1e-9), where the prior barely matters, and on
    what the fit determines: the logits on the calibration set (GQA heads share V, so the o_proj Gram is
    ill-conditioned and its weights are not identified)."""
    base, fed, refit = make_tiny(kind), make_tiny(kind), make_tiny(kind)
    flatten_gpt(base, calib_ids, CompressConfig(5, fit_ridge=1e-9, feedback=0.0), progress=False)
    flatten_gpt(fed, calib_ids, CompressConfig(5, fit_ridge=1e-9, feedback=1.0), progress=False)
    flatten_gpt(refit, calib_ids, CompressConfig(5, fit_ridge=1e-9, feedback=0.0, refit_passes=1), progress=False)
    assert _weights_equal(base, fed)
    assert torch.allclose(_logits(refit, calib_ids), _logits(base, calib_ids), atol=1e-4)


def test_refit_pass_changes_blocks_whose_inputs_changed(calib_ids):
    """Several merges: an early-fitted block sees other inputs in the final model, so the pass re-fits it."""
    a, b = make_tiny("llama"), make_tiny("llama")
    pa = flatten_gpt(a, calib_ids, CompressConfig(3), progress=False)
    pb = flatten_gpt(b, calib_ids, CompressConfig(3, refit_passes=1), progress=False)
    assert pa.groups == pb.groups and [s.kept_channels for s in pa.steps] == [s.kept_channels for s in pb.steps]
    assert not _weights_equal(a, b)


def test_feedback_output_is_closer_to_the_dense_target(calib_ids):
    """fit_block with feedback=1 fits down_proj to Y_dense: for the same kept channels (their choice does
    not depend on the target) its block output is nearer Y_dense on the calibration set than without."""
    from flatten_lightning.calibrate import BlockRunner
    from flatten_lightning.compress import fit_block
    from flatten_lightning.flatten import flatten_blocks

    errs = {}
    for fb in (0.0, 1.0):
        model = make_tiny("llama")
        runner = BlockRunner(model, "cpu")
        blocks = list(runner.adapter.blocks())
        h = runner.run_blocks(blocks[:2], runner.embed(calib_ids))
        dense_out = runner.run_blocks(blocks[2:4], h) + 0.05 * torch.randn_like(h, generator=torch.Generator().manual_seed(0))
        flat = flatten_blocks(runner.adapter, blocks[2:4])
        cfg = CompressConfig(5, feedback=fb, fit_ridge=1e-9)
        fit_block(runner, flat, blocks[2:4], h, runner.adapter.layout(), cfg, dense_out=dense_out)
        errs[fb] = (runner.run_block(flat, h) - dense_out).pow(2).sum().item()
    assert errs[1.0] < errs[0.0], errs


def test_ridge_floor_bounds_the_gcv_choice(calib_ids):
    plan = flatten_gpt(make_tiny("llama"), calib_ids, CompressConfig(4, fit_ridge="gcv", ridge_floor=0.5), progress=False)
    assert all(v >= 0.5 - 1e-12 for s in plan.steps for v in s.ridge.values())


def test_gcv_at_its_floor_is_the_fixed_ridge(calib_ids):
    """Where the floor binds (here: the grid's largest ridge), GCV and the fixed ridge give the same model, bit for bit."""
    floor = max(prune.GCV_GRID)
    gcv, fixed = make_tiny("llama"), make_tiny("llama")
    flatten_gpt(gcv, calib_ids, CompressConfig(4, fit_ridge="gcv", ridge_floor=floor), progress=False)
    flatten_gpt(fixed, calib_ids, CompressConfig(4, fit_ridge=floor), progress=False)
    for a, b in zip(gcv.state_dict().values(), fixed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_cv_with_the_fixed_ridge_chosen_is_the_fixed_ridge(calib_ids, monkeypatch):
    """Per-fold statistics sum to the single-fold ones: where CV chooses 0.1, the model is fit_ridge=0.1's.

    Also checks that CV sees cv_folds folds of whole windows whose Grams add up to the fit's."""
    seen = []

    def fake_cv(grams, crosses, yys):
        seen.append(len(grams))
        return 0.1

    monkeypatch.setattr(prune, "cv_ridge", fake_cv)
    cv, fixed = make_tiny("llama"), make_tiny("llama")
    plan = flatten_gpt(cv, calib_ids, CompressConfig(4, fit_ridge="cv", cv_folds=3, candidates=1), progress=False)
    flatten_gpt(fixed, calib_ids, CompressConfig(4, fit_ridge=0.1, candidates=1), progress=False)
    assert seen and set(seen) == {3} and len(seen) == 4 * len(plan.steps)  # the input fits, o_proj and down_proj of every merge
    assert all(v == pytest.approx(0.1) for s in plan.steps for v in s.ridge.values())
    for a, b in zip(cv.state_dict().values(), fixed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cv_ridge_is_chosen_per_fit(calib_ids, monkeypatch):
    """Each fit's recorded ridge is what cross-validation chose for it (per merge: attention inputs, o_proj, MLP
    inputs, down_proj)."""
    chosen, real = [], prune.cv_ridge
    monkeypatch.setattr(prune, "cv_ridge", lambda *a: chosen.append(real(*a)) or chosen[-1])
    plan = flatten_gpt(make_tiny("llama"), calib_ids, CompressConfig(4, fit_ridge="cv", candidates=1), progress=False)
    recorded = [v for s in plan.steps for v in (s.ridge[f] for f in ("attention_inputs", "attention", "mlp_inputs", "mlp"))]
    assert recorded == pytest.approx(chosen) and len(chosen) == 4 * len(plan.steps)


def test_ridge_rule_defaults_to_cv_except_fast_or_too_few_windows(calib_ids):
    """None resolves to "cv", to the fixed 0.1 in fast mode or with fewer windows than folds; the plan records it."""
    cfg = CompressConfig(4)
    assert (cfg.ridge_for(), cfg.ridge_for(4), cfg.ridge_for(3)) == ("cv", "cv", 0.1)
    assert CompressConfig(4, fast=True).ridge_for(64) == 0.1 and CompressConfig(4, fit_ridge=0.3).ridge_for(1) == 0.3
    assert CompressConfig.paper(4).ridge_for() == "leverage"
    assert flatten_gpt(make_tiny("llama"), calib_ids, CompressConfig(5, candidates=1), progress=False).config["fit_ridge"] == "cv"
    assert flatten_gpt(make_tiny("llama"), calib_ids[:3], CompressConfig(5, candidates=1), progress=False).config["fit_ridge"] == 0.1
    with pytest.raises(ValueError, match="cv_folds <= 3"):  # asked for explicitly, it is not silently replaced
        flatten_gpt(make_tiny("llama"), calib_ids[:3], CompressConfig(5, fit_ridge="cv"), progress=False)


def test_window_folds_do_not_depend_on_how_many_ranks_share_the_windows():
    """add_stats puts window g of the whole set in fold g mod K: two ranks holding windows 0, 2, 4 and 1, 3, 5
    (calibration_shard's rows) sum, as all-reduce does, to one process's per-fold statistics of all six."""
    from flatten_lightning.compress import add_stats

    t, n, d, k = 3, 5, 4, 4
    g = torch.Generator().manual_seed(0)
    a, y = torch.randn(6 * t, n, generator=g, dtype=torch.float64), torch.randn(6 * t, d, generator=g, dtype=torch.float64)
    one = [torch.zeros(k, n, n, dtype=torch.float64), torch.zeros(k, n, d, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)]
    add_stats(*one, a[: 2 * t], y[: 2 * t], 0, t)  # batches of two windows
    add_stats(*one, a[2 * t :], y[2 * t :], 2, t)
    two = [torch.zeros_like(x) for x in one]
    for rank in (0, 1):
        rows = torch.cat([torch.arange(w * t, (w + 1) * t) for w in range(rank, 6, 2)])
        add_stats(*two, a[rows], y[rows], 0, t, shard=(rank, 2))
    for x, z in zip(one, two, strict=True):
        torch.testing.assert_close(x, z)
    assert one[0][3].abs().sum() > 0 and one[0][0].abs().sum() > 0  # windows 0 and 4 in fold 0, 3 in fold 3


@pytest.mark.parametrize("target", ["sequential", "flattened"])
def test_kept_channel_fold_stats_are_the_full_width_ones_sliced(calib_ids, target):
    """The MLP's second pass (per fold, kept channels only) gives exactly the full-width per-fold statistics
    restricted to the kept channels; for the flattened target B_k = C_k[keep] W_down^T, yy_k = tr(W C_k W^T)."""
    from flatten_lightning.calibrate import BlockRunner
    from flatten_lightning.compress import _mlp_pass
    from flatten_lightning.flatten import flatten_blocks

    model = make_tiny("llama")
    runner = BlockRunner(model, "cpu")
    h = runner.embed(calib_ids)
    flat = flatten_blocks(runner.adapter, list(runner.adapter.blocks())[:2])
    out = h.flip(0) if target == "sequential" else None  # any target tensor of the right shape
    keep = torch.tensor([0, 3, 4, 9, 17, 30])
    g_k, b_k, yy_k = _mlp_pass(runner, flat, h, out, False, folds=3, keep=keep)
    g, b, yy = _mlp_pass(runner, flat, h, out, False, folds=3)
    if target == "flattened":
        w = runner.adapter.down_module(flat).weight.double()
        b, yy = g @ w.T, ((w @ g) * w).sum(dim=(1, 2))
    torch.testing.assert_close(g_k, g[:, keep[:, None], keep])
    torch.testing.assert_close(b_k, b[:, keep])
    torch.testing.assert_close(yy_k, yy)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(feedback=1.5), "feedback must be in"),
        (dict(feedback=0.5, correction="flattened"), "correction='sequential'"),
        (dict(refit_passes=1, correction="flattened"), "correction='sequential'"),
        (dict(refit_passes=-1), "must be >= 0"),
        (dict(head_score="leverage", refit_attention=False), "set refit_attention=True"),
        (dict(head_score="norm"), "head_score must be"),
        (dict(candidates=0), "candidates must be >= 1"),
        (dict(trial_holdout=1), "trial_holdout must be 0"),
        (dict(fit_ridge="loo"), "fit_ridge must be a number"),
        (dict(fit_ridge="cv", cv_folds=1), "cv_folds >= 2"),
    ],
)
def test_config_refuses_inconsistent_levers(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CompressConfig(4, **kw)


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_leverage_head_score_keeps_whole_kv_groups(kind, calib_ids):
    """The leverage choice goes through the same group selection: K of 2K whole groups, original widths."""
    model = make_tiny(kind)
    plan = flatten_gpt(model, calib_ids, CompressConfig(4, head_score="leverage"), progress=False)
    assert get_adapter(model).is_plain()
    assert all(len(s.kept_kv_groups) == 2 and all(0 <= g < 4 for g in s.kept_kv_groups) for s in plan.steps)


def test_candidate_pairs_most_similar_first_within_the_group_limit():
    from flatten_lightning.compress import candidate_pairs, choose_pair

    sims, groups = [0.90, 0.97, 0.95, 0.97], [[0], [1, 2], [3], [4], [5]]
    assert candidate_pairs(sims, groups, 0, 3) == [1, 3, 2]  # ties: the shallower pair first
    assert candidate_pairs(sims, groups, 2, 9) == [3, 2]  # pairs 0 and 1 would hold 3 blocks
    assert choose_pair(sims, groups, 2) == 3


@pytest.mark.parametrize("fast", [False, True])
def test_fast_mode_measures_only_the_merged_block_again(calib_ids, monkeypatch, fast):
    """After each merge at k, the full mode re-measures blocks k.. of the compressed model; fast mode block k only."""
    import flatten_lightning.compress as compress

    calls, real = [], compress.io_similarities
    monkeypatch.setattr(
        compress,
        "io_similarities",
        lambda runner, h, blocks, **kw: calls.append((kw.get("start", 0), len(blocks))) or real(runner, h, blocks, **kw),
    )
    model = make_tiny("llama")
    n = model.config.num_hidden_layers
    plan = flatten_gpt(model, calib_ids, CompressConfig(3, fast=fast), progress=False)
    assert calls[0] == (0, n) and len(calls) == 1 + len(plan.steps)
    for i, (step, (start, measured)) in enumerate(zip(plan.steps, calls[1:])):
        depth_after = n - i - 1
        assert start == step.position and measured == (1 if fast else depth_after - step.position)
    assert get_adapter(model).is_plain() and model.config.num_hidden_layers == 3


def test_fast_mode_keeps_the_similarities_of_blocks_it_did_not_touch(calib_ids):
    """Fast mode's second choice uses the dense model's similarities for pairs away from the first merge."""
    model = make_tiny("llama", num_hidden_layers=8)
    plan = flatten_gpt(model, calib_ids, CompressConfig(6, fast=True, candidates=1), progress=False)
    first, second = plan.steps
    dense = plan.initial_similarities
    assert second.position != first.position  # on this model the second merge does not hold the first
    # Blocks before the merged one keep their index, blocks after it move down by one.
    expected = dense[second.position] if second.position < first.position else dense[second.position + 1]
    assert second.similarity == expected


def test_fast_mode_scores_channels_by_energy_unless_told_otherwise(calib_ids):
    assert (CompressConfig(3).channels_by, CompressConfig(3, fast=True).channels_by) == ("loss", "energy")
    assert CompressConfig(3, fast=True, channel_score="leverage").channels_by == "leverage"
    assert CompressConfig(3, fast=True, correction="flattened", feedback=0.0).channels_by == "loss"  # energy needs it
    assert CompressConfig.paper(3).channels_by == "leverage"  # the paper's Nystrom selection
    with pytest.raises(ValueError, match="channel_score='energy' fits .* correction='sequential'"):
        CompressConfig(3, channel_score="energy", correction="flattened", feedback=0.0)
    fast, energy = make_tiny("llama"), make_tiny("llama")
    pf = flatten_gpt(fast, calib_ids, CompressConfig(3, fast=True), progress=False)
    pe = flatten_gpt(energy, calib_ids, CompressConfig(3, fast=True, channel_score="energy"), progress=False)
    assert [s.kept_channels for s in pf.steps] == [s.kept_channels for s in pe.steps]
    assert all(torch.equal(x, y) for x, y in zip(fast.state_dict().values(), energy.state_dict().values(), strict=True))


def test_candidates_keep_the_pair_ending_nearest_the_dense_model(calib_ids):
    """Each step tries the 3 most similar pairs and keeps the one of least final error (recorded in the plan)."""
    model = make_tiny("llama")
    plan = flatten_gpt(model, calib_ids, CompressConfig(3), progress=False)  # candidates=3 is the default
    assert get_adapter(model).is_plain() and len(plan.steps) == 3
    for step in plan.steps:
        assert len(step.candidates) == 3 and step.position in [k for k, _ in step.candidates]
        errors = dict((k, e) for k, e in step.candidates)
        assert errors[step.position] == min(errors.values())
    # The first step's candidates are the three most similar pairs of the dense model.
    sims = plan.initial_similarities[:-1]
    assert [k for k, _ in plan.steps[0].candidates] == sorted(range(len(sims)), key=lambda k: -sims[k])[:3]
    assert Plan.from_dict(plan.to_dict()).steps[0].candidates == plan.steps[0].candidates


def test_holdout_rows_score_every_nth_window_and_fit_the_rest():
    fit, scored = holdout_rows(10, 4)
    assert scored.tolist() == [3, 7] and fit.tolist() == [0, 1, 2, 4, 5, 6, 8, 9]
    with pytest.raises(ValueError, match="a rank has only 3"):
        holdout_rows(3, 4)


def test_held_out_trials_fit_without_the_scored_windows_then_refit_the_chosen_on_all(calib_ids, monkeypatch):
    """trial_holdout=4 on 8 windows: each candidate is fitted on 6 and its final error measured on the other 2;
    the chosen pair is then fitted again on all 8, and the model is what fitting that pair alone gives."""
    import flatten_lightning.compress as compress

    fits, scores = [], []
    real_fit, real_err = compress.fit_block, compress.final_error
    monkeypatch.setattr(compress, "fit_block", lambda r, b, o, h, *a, **kw: fits.append(len(h)) or real_fit(r, b, o, h, *a, **kw))
    monkeypatch.setattr(compress, "final_error", lambda r, b, h, *a, **kw: scores.append(len(h)) or real_err(r, b, h, *a, **kw))
    model = make_tiny("llama")
    plan = flatten_gpt(model, calib_ids, CompressConfig(5, trial_holdout=4), progress=False)
    assert fits == [6, 6, 6, 8] and scores == [2, 2, 2]
    errors = dict(plan.steps[0].candidates)
    assert len(errors) == 3 and errors[plan.steps[0].position] == min(errors.values())
    # The chosen pair fitted on every window: the same weights as a one-candidate run forced onto that pair.
    monkeypatch.setattr(compress, "candidate_pairs", lambda *a, **kw: [plan.steps[0].position])
    alone = make_tiny("llama")
    flatten_gpt(alone, calib_ids, CompressConfig(5, candidates=1), progress=False)
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), alone.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="trial_holdout=16"):
        flatten_gpt(make_tiny("llama"), calib_ids, CompressConfig(5, trial_holdout=16), progress=False)


def test_fast_mode_compares_candidates_by_parallel_error_and_fits_only_the_chosen(calib_ids, monkeypatch):
    """Fast mode: the 3 most similar pairs are scored by parallel error (recorded), the least is merged,
    and one block is fitted per step (the default fits all three and runs each to the end)."""
    import flatten_lightning.compress as compress

    fits, real = [], compress.fit_block
    monkeypatch.setattr(compress, "fit_block", lambda *a, **kw: fits.append(1) or real(*a, **kw))
    model = make_tiny("llama")
    plan = flatten_gpt(model, calib_ids, CompressConfig(3, fast=True), progress=False)
    assert len(fits) == len(plan.steps) == 3 and get_adapter(model).is_plain()
    for step in plan.steps:
        errors = dict(step.candidates)
        assert len(errors) == 3 and errors[step.position] == min(errors.values())
    sims = plan.initial_similarities[:-1]
    assert sorted(dict(plan.steps[0].candidates)) == sorted(sorted(range(len(sims)), key=lambda k: -sims[k])[:3])
    fits.clear()
    flatten_gpt(make_tiny("llama"), calib_ids, CompressConfig(3), progress=False)
    assert len(fits) == 3 * 3


def test_fast_mode_parallel_errors_are_the_same_from_kept_inputs_or_recomputed(calib_ids):
    """input_stride 1 reads the pair's inner input and output from the cache, 0 runs the pair on the rows: on
    the dense model (the first step, nothing stale yet) the errors agree."""
    plans = [flatten_gpt(make_tiny("llama"), calib_ids, CompressConfig(5, fast=True, input_stride=s), progress=False) for s in (1, 0)]
    kept, rerun = (dict(p.steps[0].candidates) for p in plans)
    assert kept.keys() == rerun.keys() and all(kept[k] == pytest.approx(rerun[k], rel=1e-9) for k in kept)


def test_given_groups_rebuild_a_free_runs_model_exactly(calib_ids):
    """A one-candidate run's groups, given back, merge in the same order to the same weights, without trials."""
    free, fixed = make_tiny("llama"), make_tiny("llama")
    plan = flatten_gpt(free, calib_ids, CompressConfig(3, candidates=1), progress=False)
    merged = [g for g in plan.groups if len(g) > 1]  # singletons left out
    again = flatten_gpt(fixed, calib_ids, CompressConfig(3, groups=merged), progress=False)  # candidates 3 ignored
    assert again.groups == plan.groups
    assert [s.position for s in again.steps] == [s.position for s in plan.steps]
    assert all(s.candidates == [] for s in again.steps)  # no trial fitted
    assert torch.equal(_logits(free, calib_ids[:1]), _logits(fixed, calib_ids[:1]))


def test_given_groups_are_followed_where_similarity_would_go_elsewhere(calib_ids):
    model = make_tiny("llama")  # 6 blocks
    dense_sims = flatten_gpt(make_tiny("llama"), calib_ids, CompressConfig(5, candidates=1), progress=False)
    best = dense_sims.steps[0].position  # the pair similarity picks first
    wanted = [[0, 1, 2]] if best >= 2 else [[3, 4, 5]]  # a run that does not hold that pair
    plan = flatten_gpt(model, calib_ids, CompressConfig(4, groups=wanted), progress=False)
    assert [g for g in plan.groups if len(g) > 1] == wanted
    first, _ = plan.steps  # within the run, its more similar pair first
    sims = plan.initial_similarities
    start = wanted[0][0]
    assert first.position == max((start, start + 1), key=lambda k: sims[k])


@pytest.mark.parametrize(
    ("groups", "target", "msg"),
    [
        ([[2, 1]], 5, "disjoint runs of adjacent"),
        ([[0, 1], [1, 2]], 4, "disjoint runs of adjacent"),
        ([[4, 5, 6]], 4, r"in 0\.\.5"),
        ([[0, 1]], 3, "leave 5 of 6 blocks, not the target 3"),
    ],
)
def test_given_groups_are_checked_before_any_work(calib_ids, groups, target, msg):
    with pytest.raises(ValueError, match=msg):
        flatten_gpt(make_tiny("llama"), calib_ids, CompressConfig(target, groups=groups), progress=False)


def test_given_groups_respect_the_group_size_limit():
    with pytest.raises(ValueError, match="longer than max_group_size=2"):
        CompressConfig(3, groups=[[0, 1, 2]], max_group_size=2)
    assert CompressConfig(3, groups=[[0, 1, 2]], max_group_size=3).groups == [[0, 1, 2]]


def _input_fit_case(model, inputs, sub: str, ridge: float):
    """Flatten blocks 0-1 of ``model``, fit the parts' ``sub`` inputs on ``inputs``; returns what the test needs."""
    from flatten_lightning.calibrate import BlockRunner, no_reduce
    from flatten_lightning.compress import as_rows, fit_part_inputs, part_inputs
    from flatten_lightning.flatten import flatten_blocks

    runner = BlockRunner(model, "cpu")
    ad = runner.adapter
    parts = list(ad.blocks())[:2]
    h = runner.embed(inputs)
    flat = flatten_blocks(ad, parts)
    before = ad.read(flat)
    fit_part_inputs(runner, flat, parts, part_inputs(runner, parts, h)[sub], h, sub, CompressConfig(2, fit_ridge=ridge), no_reduce)
    ctx = runner.context(h)
    h1 = runner.run_block(parts[0], h)
    if sub == "attn":
        shared = as_rows(ad.norm_of(flat, "attn")(h))
        seen = [as_rows(ad.norm_of(parts[1], "attn")(h1))]
    else:
        shared = as_rows(ad.norm_of(flat, "mlp")(h + ad.attention(flat, h, ctx)))
        seen = [as_rows(ad.norm_of(p, "mlp")(x + ad.attention(p, x, ctx))) for p, x in zip(parts, (h, h1), strict=True)]
    shifts = [getattr(ad.read(p), "attn_norm" if sub == "attn" else "mlp_norm").shift for p in parts[2 - len(seen) :]]
    seen = [x if b is None else x - b for x, b in zip(seen, shifts, strict=True)]
    return ad, parts, before, ad.read(flat), shared, seen


@pytest.mark.parametrize("kind", ["llama", "qwen2", "phi3"])
def test_attention_input_fit_gives_part_two_the_least_squares_map_of_its_sequential_input(kind, calib_ids):
    """Nearly unregularised, the second part's q/k/v rows become W_1 M, M the least-squares map from the shared n(h)
    to what the part read in sequence (its norm of block 0's output); the first part's rows (input h: exact) stay."""
    ad, parts, before, after, shared, (seen,) = _input_fit_case(make_tiny(kind), calib_ids, "attn", 1e-12)
    m = torch.linalg.lstsq(shared, seen).solution.T  # seen ~ shared M^T
    for name in ("q", "k", "v"):
        half = getattr(before, name).weight.shape[0] // 2
        assert torch.equal(getattr(after, name).weight[:half], getattr(before, name).weight[:half])
        torch.testing.assert_close(getattr(after, name).weight[half:], getattr(ad.read(parts[1]), name).weight @ m, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(getattr(after, name).weight[half:], getattr(before, name).weight[half:], atol=1e-3)


@pytest.mark.parametrize("kind", ["llama", "llama-bias"])
def test_mlp_input_fit_maps_the_shared_input_to_each_parts_own(kind, calib_ids):
    """Both parts' gate/up rows become W_j M_j, M_j the least-squares map from n(h + A_flat(h)) to part j's own MLP input
    in sequence; biases are kept (a bias enters after the map)."""
    ad, parts, before, after, shared, seen = _input_fit_case(make_tiny(kind), calib_ids, "mlp", 1e-12)
    for name in ("gate", "up"):
        rows = getattr(before, name).weight.shape[0] // 2
        for j, x in enumerate(seen):
            m = torch.linalg.lstsq(shared, x).solution.T
            got = getattr(after, name).weight[j * rows : (j + 1) * rows]
            torch.testing.assert_close(got, getattr(ad.read(parts[j]), name).weight @ m, rtol=1e-6, atol=1e-7)
        bias = getattr(after, name).bias
        assert (bias is None) == (getattr(before, name).bias is None) and (bias is None or torch.equal(bias, getattr(before, name).bias))


def test_input_fit_of_a_layernorm_family_subtracts_the_shift(calib_ids):
    """ViT's LayerNorm adds a shift b (folded into the flattened bias): the fitted map targets g n(h_j), not g n(h_j) + b,
    so the part's pre-activation W_j M n + (c_j + W_j b) is the least-squares one. n(h) has mean zero, so the map
    is determined on the calibration inputs only: the pre-activations there are compared."""
    from vision_helpers import make_tiny_vision, pixels

    ad, parts, before, after, shared, (seen,) = _input_fit_case(make_tiny_vision("vit"), pixels(8), "attn", 1e-12)
    m = torch.linalg.lstsq(shared, seen).solution.T
    half = before.q.weight.shape[0] // 2
    torch.testing.assert_close(shared @ after.q.weight[half:].T, shared @ (ad.read(parts[1]).q.weight @ m).T, rtol=1e-6, atol=1e-7)
    assert torch.equal(after.q.bias, before.q.bias)


@pytest.mark.parametrize("sub", ["attn", "mlp"])
def test_input_fit_under_a_huge_ridge_keeps_the_flattened_rows(sub, calib_ids):
    """The fit shrinks towards diag(g_j), the map the flattened block already applies: lam -> inf changes nothing."""
    _, _, before, after, _, _ = _input_fit_case(make_tiny("llama"), calib_ids, sub, 1e9)
    for name in ("q", "k", "v", "gate", "up"):
        torch.testing.assert_close(getattr(after, name).weight, getattr(before, name).weight, rtol=1e-6, atol=1e-8)


def test_input_fit_is_on_by_default_off_in_fast_mode_and_the_papers_recipe():
    assert CompressConfig(4).fits_inputs and not CompressConfig(4, fast=True).fits_inputs
    assert CompressConfig(4, fast=True, input_fit=True).fits_inputs and not CompressConfig.paper(4).fits_inputs
    assert not CompressConfig(4, input_fit=False).fits_inputs
