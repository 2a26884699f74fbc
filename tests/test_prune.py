"""Pruning maths: GQA head selection, ridge leverage, the least-squares correction, keep-all identity."""

import pytest
import torch

from flatten_lightning import prune
from flatten_lightning.adapters import Affine, HeadLayout, get_adapter
from flatten_lightning.calibrate import BlockRunner
from flatten_lightning.compress import CompressConfig, prune_attention_stage, prune_mlp_stage, sequential_targets
from flatten_lightning.flatten import flatten_blocks


def test_ridge_solve_is_closed_form_ridge_least_squares():
    g = torch.Generator().manual_seed(0)
    phi, y, lam = torch.randn(200, 12, generator=g, dtype=torch.float64), torch.randn(200, 5, generator=g, dtype=torch.float64), 0.7
    w_t = prune.ridge_solve(phi.T @ phi, phi.T @ y, lam)
    # Augmented least squares [Phi; sqrt(lam) I] w = [Y; 0] is the ridge problem's definition.
    a = torch.cat([phi, lam**0.5 * torch.eye(12, dtype=torch.float64)])
    b = torch.cat([y, torch.zeros(12, 5, dtype=torch.float64)])
    ref = torch.linalg.lstsq(a, b).solution
    assert torch.allclose(w_t, ref, atol=1e-10)


def test_ridge_leverage_matches_definition_and_limits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    c = x.T @ x / 50
    lam = 0.3
    ref = torch.diagonal(c @ torch.linalg.inv(c + lam * torch.eye(8, dtype=torch.float64)))
    assert torch.allclose(prune.ridge_leverage(c, lam), ref, atol=1e-12)
    assert torch.allclose(prune.ridge_leverage(c, 1e-12), torch.ones(8, dtype=torch.float64), atol=1e-6)
    # lam = 0 takes the spectral path (no Cholesky of C + lam I): full rank -> 1, a dead channel -> 0.
    assert torch.allclose(prune.ridge_leverage(c, 0.0), torch.ones(8, dtype=torch.float64), atol=1e-10)
    dead = x.clone()
    dead[:, 3] = 0
    scores = prune.ridge_leverage(dead.T @ dead / 50, 0.0)
    assert scores[3].abs() < 1e-10 and torch.allclose(scores[[0, 1, 2, 4, 5, 6, 7]], torch.ones(7, dtype=torch.float64), atol=1e-10)


def test_gqa_group_selection_keeps_whole_groups():
    scores = torch.tensor([1.0, 1, 1, 9, 9, 9, 0, 0, 0, 5, 0, 0])  # 4 groups of n_rep=3
    groups = prune.select_kv_groups(scores, n_rep=3, n_keep=2)
    assert groups.tolist() == [1, 3]  # sums 3, 27, 0, 5
    assert prune.heads_of_groups(groups, 3).tolist() == [3, 4, 5, 9, 10, 11]


def test_pruned_attention_equals_flattened_with_dropped_heads_zeroed(tiny):
    """No refit: keeping groups = zeroing the o columns of the dropped heads (GQA wiring right)."""
    cfg = tiny.config
    d, n_rep = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    ad = get_adapter(tiny)
    flat = flatten_blocks(ad, list(tiny.model.layers[:2]))
    ref = flatten_blocks(ad, list(tiny.model.layers[:2]))
    runner = BlockRunner(tiny, "cpu")
    h = torch.randn(2, 16, cfg.hidden_size, dtype=torch.float64)
    ctx = runner.context(h)
    groups = torch.tensor([0, 3])
    keep_cols = prune.unit_rows(prune.heads_of_groups(groups, n_rep), d)
    w = ad.read(ref)
    mask = torch.zeros(w.o.weight.shape[1], dtype=torch.bool)
    mask[keep_cols] = True
    ad.write(ref, w.with_(o=Affine(w.o.weight * mask, w.o.bias)))
    ad.write(flat, prune.keep_heads(ad.read(flat), groups, n_rep, d))
    assert ad.heads_of(ad.read(flat)) == (cfg.num_attention_heads, cfg.num_key_value_heads)
    assert torch.allclose(ad.attention(flat, h, ctx), ad.attention(ref, h, ctx), atol=1e-10)


def test_keeping_everything_with_no_ridge_changes_nothing(tiny):
    cfg = tiny.config
    flat = flatten_blocks(get_adapter(tiny), list(tiny.model.layers[1:3]))
    before = {k: v.clone() for k, v in flat.state_dict().items()}
    runner = BlockRunner(tiny, "cpu")
    h = torch.randn(16, 32, cfg.hidden_size, dtype=torch.float64)
    out_before = runner.run_block(flat, h)
    wide = HeadLayout(2 * cfg.num_attention_heads, 2 * cfg.num_key_value_heads, cfg.head_dim)
    c = CompressConfig(1, correction="flattened", refit_attention=True, fit_ridge=0.0, feedback=0.0)
    groups, _ = prune_attention_stage(runner, flat, h, None, wide, c, lambda t: t)
    channels, _ = prune_mlp_stage(runner, flat, h, None, 2 * cfg.intermediate_size, c, lambda t: t)
    assert groups == list(range(2 * cfg.num_key_value_heads)) and channels == list(range(2 * cfg.intermediate_size))
    for k, v in flat.state_dict().items():
        assert torch.allclose(v, before[k], atol=1e-8), k
    assert (runner.run_block(flat, h) - out_before).abs().max() < 1e-8


def _flattened_pair(tiny, first):
    """Blocks first, first + 1 of ``tiny`` flattened, a runner, a random input h [8, 24, D] and the pair's
    sequential targets (attention output, block output) on it."""
    originals = list(tiny.model.layers[first : first + 2])
    flat = flatten_blocks(get_adapter(tiny), originals)
    runner = BlockRunner(tiny, "cpu", batch_size=3)
    h = torch.randn(8, 24, tiny.config.hidden_size, dtype=torch.float64)
    return (flat, runner, h, *sequential_targets(runner, originals, h))


def _mlp_activations(runner, flat, h):
    """u = h + A(h) [N, T, D] and psi = the down projection's input [N*T, width], computed directly."""
    ad = runner.adapter
    u = h + ad.attention(flat, h, runner.context(h))
    seen = []
    handle = ad.down_module(flat).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    ad.mlp(flat, u)
    handle.remove()
    return u, seen[0].reshape(-1, seen[0].shape[-1])


@torch.no_grad()
@pytest.mark.parametrize("score", ["leverage", "energy", "loss"])
def test_mlp_correction_is_ridge_least_squares_on_sequential_target(tiny, score):
    """down_proj after pruning = (Psi_S^T Psi_S + lam I)^-1 (Psi_S^T (y_seq - u) + lam W0^T), from raw activations.

    W0 are the flattened block's down_proj columns of the kept channels (the ridge's prior). The channels S are
    the ridge-leverage top-I of the full Gram, or (energy: two passes, no full Gram) the top-I of
    sqrt(E psi_j^2) ||W_down[:, j]||, or (loss) the backward elimination under the fit's own objective; the fit
    is the same in every case.
    """
    cfg = tiny.config
    flat, runner, h, attn_t, out_t = _flattened_pair(tiny, 2)
    c = CompressConfig(1, fit_ridge=1e-2, channel_score=score)
    prune_attention_stage(
        runner, flat, h, attn_t, HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim), c, lambda t: t
    )
    # Raw activations of the attention-pruned flat block, all at once (the stage streams them).
    u, psi = _mlp_activations(runner, flat, h)
    down = runner.adapter.down_module(flat)
    target = (out_t - u).reshape(-1, cfg.hidden_size)
    if down.bias is not None:
        target = target - down.bias
    w_flat = down.weight.clone()
    channels, ridge = prune_mlp_stage(runner, flat, h, out_t, cfg.intermediate_size, c, lambda t: t)
    assert ridge == pytest.approx(1e-2)
    ps = psi[:, channels]
    gram = ps.T @ ps
    lam = 1e-2 * torch.diagonal(gram).mean()
    w0 = w_flat[:, channels]
    expected = torch.linalg.solve(gram + lam * torch.eye(len(channels), dtype=torch.float64), ps.T @ target + lam * w0.T).T
    assert torch.allclose(runner.adapter.down_module(flat).weight, expected, atol=1e-8)
    full = psi.T @ psi
    if score == "leverage":
        assert channels == prune.select_channels(full, cfg.intermediate_size, 10.0 * prune.mean_eigenvalue(full)).tolist()
    elif score == "loss":
        lam_full = 1e-2 * prune.mean_eigenvalue(full)
        assert channels == prune.select_by_loss(full, psi.T @ target, cfg.intermediate_size, lam_full).tolist()
    else:
        energy = torch.diagonal(full).div(len(psi)).sqrt() * w_flat.norm(dim=0)
        assert channels == torch.topk(energy, cfg.intermediate_size).indices.sort().values.tolist()


def _ridge_residual(c, b, yy, lam, keep):
    """E(S) = ||Y||^2 - tr(B_S^T (C_SS + lam I)^-1 B_S), the ridge fit's objective at its optimum, directly."""
    s = torch.tensor(sorted(keep))
    return yy - float((b[s] * torch.linalg.solve(c[s][:, s] + lam * torch.eye(len(s), dtype=c.dtype), b[s])).sum())


@pytest.mark.parametrize("unit", [1, 3])
def test_loss_selection_one_unit_per_round_is_exact_backward_elimination(unit):
    """With one unit (a channel, or a KV group of ``unit`` columns) per round the saliency
    tr(W_g^T P_gg^-1 W_g) and the exact downdates reproduce brute-force backward elimination: each round drops
    the unit whose removal raises the re-fitted objective least."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 24, dtype=torch.float64, generator=g)
    x[:, 6] = x[:, 3] + 0.01 * torch.randn(400, dtype=torch.float64, generator=g)  # a near-duplicate column
    y = x[:, :8] @ torch.randn(8, 5, dtype=torch.float64, generator=g) + 0.1 * torch.randn(400, 5, dtype=torch.float64, generator=g)
    c, b, yy = x.T @ x, x.T @ y, float(y.pow(2).sum())
    lam = 0.1 * prune.mean_eigenvalue(c)
    n, n_keep = 24 // unit, 9 // unit

    def cols(units):
        return prune.unit_rows(torch.tensor(sorted(units)), unit).tolist()

    keep = list(range(n))
    while len(keep) > n_keep:
        keep.remove(min(keep, key=lambda j: _ridge_residual(c, b, yy, lam, cols([i for i in keep if i != j]))))
    assert prune.select_by_loss(c, b, n_keep, lam, unit=unit, rounds=n - n_keep).tolist() == sorted(keep)
    # Several units per round: the same objective within a little of the exact greedy here.
    few = prune.select_by_loss(c, b, n_keep, lam, unit=unit, rounds=2).tolist()
    assert _ridge_residual(c, b, yy, lam, cols(few)) <= 1.01 * _ridge_residual(c, b, yy, lam, cols(keep))


def test_channels_by_loss_keep_what_the_target_needs_where_leverage_keeps_energy():
    """Channels 0-3 make the target; 4-11 are louder but unused. The loss keeps 0-3, the leverage the loud ones."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 12, dtype=torch.float64, generator=g)
    x[:, 4:] *= 10.0
    y = x[:, :4] @ torch.randn(4, 3, dtype=torch.float64, generator=g)
    c, b = x.T @ x, x.T @ y
    assert prune.select_by_loss(c, b, 4, 1e-3 * prune.mean_eigenvalue(c)).tolist() == [0, 1, 2, 3]
    assert prune.select_channels(c, 4, 10.0 * prune.mean_eigenvalue(c)).tolist() != [0, 1, 2, 3]
    with pytest.raises(ValueError, match="cannot keep 13 of 12"):
        prune.select_by_loss(c, b, 13, 1.0)
    with pytest.raises(ValueError, match="head_score='loss' chooses heads for the o_proj refit"):
        CompressConfig(4, head_score="loss", refit_attention=False)


def test_channel_energy_is_rms_activation_times_column_norm():
    sq = torch.tensor([4.0, 0.0, 1.0])  # sums of psi_j^2 over 4 tokens
    w = torch.tensor([[3.0, 1.0, 0.0], [4.0, 1.0, 2.0]])  # column norms 5, sqrt(2), 2
    assert torch.allclose(prune.channel_energy(sq, 4, w), torch.tensor([5.0, 0.0, 1.0], dtype=torch.float64))


def test_gcv_from_streamed_statistics_matches_direct_computation():
    """GCV computed from (G, B, ||Y||^2) equals RSS / (1 - df/n)^2 computed on the raw data."""
    g = torch.Generator().manual_seed(3)
    n, p, d = 60, 20, 4
    phi = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = phi @ torch.randn(p, d, generator=g, dtype=torch.float64) + 2.0 * torch.randn(n, d, generator=g, dtype=torch.float64)
    gram, cross, yy = phi.T @ phi, phi.T @ y, float(y.pow(2).sum())
    scale = float(torch.diagonal(gram).mean())
    direct = {}
    for rel in prune.GCV_GRID:
        lam = rel * scale
        w = torch.linalg.solve(gram + lam * torch.eye(p, dtype=torch.float64), cross)
        hat_trace = torch.trace(phi @ torch.linalg.solve(gram + lam * torch.eye(p, dtype=torch.float64), phi.T))
        direct[lam] = float((y - phi @ w).pow(2).sum()) / (1 - float(hat_trace) / n) ** 2
    best = min(direct, key=direct.get)
    assert prune.gcv_ridge(gram, cross, yy, n) == pytest.approx(best)
    # Noisy targets with few samples per parameter: GCV must choose real shrinkage, not ~0.
    assert best > prune.GCV_GRID[0] * scale


def test_cv_ridge_from_fold_statistics_matches_refitting_each_fold():
    """K-fold CV from per-fold (G_k, B_k, ||Y_k||^2) equals fitting on the other folds' rows and scoring on fold k's."""
    g = torch.Generator().manual_seed(5)
    k, rows, p, d = 4, 30, 12, 3
    phi = torch.randn(k, rows, p, generator=g, dtype=torch.float64)
    y = phi @ torch.randn(p, d, generator=g, dtype=torch.float64) + 3.0 * torch.randn(k, rows, d, generator=g, dtype=torch.float64)
    grams, crosses, yys = phi.mT @ phi, phi.mT @ y, y.pow(2).sum(dim=(1, 2))
    direct = []
    for rel in prune.CV_GRID:
        err = 0.0
        for f in range(k):
            rest = [j for j in range(k) if j != f]
            a, b = phi[rest].reshape(-1, p), y[rest].reshape(-1, d)
            lam = rel * float(torch.linalg.eigvalsh(a.T @ a).mean())
            w = torch.linalg.solve(a.T @ a + lam * torch.eye(p, dtype=torch.float64), a.T @ b)
            err += float((y[f] - phi[f] @ w).pow(2).sum())
        direct.append(err)
    best = prune.CV_GRID[min(range(len(direct)), key=direct.__getitem__)]
    assert prune.cv_ridge(grams, crosses, yys) == pytest.approx(best)
    # 30 noisy rows per fold for 12 weights: CV must choose real shrinkage, not the grid's least.
    assert best > prune.CV_GRID[0]


@torch.no_grad()
def test_paper_mode_is_lemma_closed_form():
    """Paper recipe: W_down,S^T = (C_SS + lam I)^-1 C_S: W_down^T with lam = 10 x mean eigenvalue of C."""
    from conftest import make_tiny

    model = make_tiny("llama")
    cfg = model.config
    flat = flatten_blocks(get_adapter(model), list(model.model.layers[1:3]))
    runner = BlockRunner(model, "cpu", batch_size=4)
    h = torch.randn(8, 24, cfg.hidden_size, dtype=torch.float64)
    pe = runner.context(h)["position_embeddings"]
    mlp = flat.mlp
    x = flat.post_attention_layernorm(h + flat.self_attn(flat.input_layernorm(h), position_embeddings=pe, attention_mask=None)[0])
    psi = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).reshape(-1, mlp.down_proj.in_features)
    c = psi.T @ psi
    w = mlp.down_proj.weight.clone()
    channels, ridge = prune_mlp_stage(runner, flat, h, None, cfg.intermediate_size, CompressConfig.paper(1), lambda t: t)
    lam = 10.0 * torch.diagonal(c).mean()
    s = torch.tensor(channels)
    expected = torch.linalg.solve(c[s][:, s] + lam * torch.eye(len(s), dtype=torch.float64), c[s] @ w.T).T
    assert torch.allclose(mlp.down_proj.weight, expected, atol=1e-8)


@torch.no_grad()
def test_heads_by_loss_keep_the_kv_groups_the_refit_loses_least_without(tiny):
    """head_score="loss": the kept KV groups are select_by_loss on the raw head outputs z (units of n_rep heads)
    and the sequential attention target, under the refit's own ridge; o_proj is then refitted on them."""
    cfg = tiny.config
    flat, runner, h, attn_t, _ = _flattened_pair(tiny, 1)
    layout = HeadLayout(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    o = runner.adapter.o_module(flat)
    seen = []
    handle = o.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    runner.adapter.attention(flat, h, runner.context(h))
    handle.remove()
    z = seen[0].reshape(-1, o.in_features)
    y = attn_t.reshape(-1, cfg.hidden_size) - (o.bias if o.bias is not None else 0.0)
    c = CompressConfig(1, head_score="loss", fit_ridge=1e-2)
    groups, _ = prune_attention_stage(runner, flat, h, attn_t, layout, c, lambda t: t)
    gram = z.T @ z
    unit = layout.n_rep * layout.head_dim
    assert groups == prune.select_by_loss(gram, z.T @ y, layout.n_kv_heads, 1e-2 * prune.mean_eigenvalue(gram), unit=unit).tolist()
    assert len(groups) == layout.n_kv_heads and groups == sorted(groups)


def test_head_leverage_scores_a_duplicated_head_low():
    """Heads 0 and 2 output the same columns: either can stand for both, so each carries half the
    leverage and, keeping 3 of 4 (n_rep = 1), exactly one of them goes."""
    g = torch.Generator().manual_seed(0)
    d = 4
    z = torch.randn(400, 4 * d, dtype=torch.float64, generator=g)
    z[:, 2 * d : 3 * d] = z[:, 0:d]
    gram = z.T @ z
    scores = prune.head_leverage(gram, 1e-3 * prune.mean_eigenvalue(gram), d)
    assert scores[0] == pytest.approx(scores[2]) and scores[0] < 0.6 * scores[1]
    kept = prune.select_kv_groups(scores, 1, 3).tolist()
    assert len({0, 2} & set(kept)) == 1 and {1, 3} <= set(kept)
