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
@pytest.mark.parametrize("score", ["leverage", "energy"])
def test_mlp_correction_is_ridge_least_squares_on_sequential_target(tiny, score):
    """down_proj after pruning = (Psi_S^T Psi_S + lam I)^-1 (Psi_S^T (y_seq - u) + lam W0^T), from raw activations.

    W0 are the flattened block's down_proj columns of the kept channels (the ridge's prior). The channels S are
    the ridge-leverage top-I of the full Gram, or (energy: two passes, no full Gram) the top-I of
    sqrt(E psi_j^2) ||W_down[:, j]||; the fit is the same either way.
    """
    cfg = tiny.config
    originals = list(tiny.model.layers[2:4])
    flat = flatten_blocks(get_adapter(tiny), originals)
    runner = BlockRunner(tiny, "cpu", batch_size=3)
    h = torch.randn(8, 24, cfg.hidden_size, dtype=torch.float64)
    attn_t, out_t = sequential_targets(runner, originals, h)
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
    else:
        energy = torch.diagonal(full).div(len(psi)).sqrt() * w_flat.norm(dim=0)
        assert channels == torch.topk(energy, cfg.intermediate_size).indices.sort().values.tolist()


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
