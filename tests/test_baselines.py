"""Peer methods on tiny random models: target depth, consistent configs, plain reload, and each
method's defining property checked against an independent computation (brute force or the formula)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_tiny
from transformers import AutoModelForCausalLM

from flatten_lightning import baselines as B
from flatten_lightning import methods as M
from flatten_lightning.adapters import get_adapter

TARGET = 4  # tiny models have 6 blocks


def _pe(model, h):
    return model.model.rotary_emb(h, position_ids=torch.arange(h.shape[1])[None])


def _ppl(model, ids) -> float:
    """Calibration perplexity through the stock HF forward (causal mask and all): the brute-force path."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(nll.item())


def _without(model, drop: list[int]):
    m = copy.deepcopy(model)
    keep = [i for i in range(len(m.model.layers)) if i not in drop]
    get_adapter(m).install([m.model.layers[i] for i in keep], [[i] for i in keep])
    return m


def _check_consistent(model, n_layers: int) -> None:
    cfg = model.config
    assert cfg.num_hidden_layers == len(model.model.layers) == n_layers
    assert [b.self_attn.layer_idx for b in model.model.layers] == list(range(n_layers))
    if getattr(cfg, "layer_types", None) is not None:
        assert len(cfg.layer_types) == n_layers


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama-bias"])
@pytest.mark.parametrize("method", M.METHODS)
def test_reaches_target_with_consistent_config_and_plain_reload(method, kind, calib_ids, tmp_path):
    model = make_tiny(kind)
    dense_params = M.count_parameters(model)
    r = M.compress_with(method, model, calib_ids, TARGET, progress=False)
    ids = calib_ids[:2]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    if method == "blockpruner":  # parameter budget: depth can stay above the target (packing, zeroed partners)
        _check_consistent(model, r.layers)
        assert r.layers >= TARGET
        assert dense_params - r.params_active >= r.info["params_budget"]
    else:
        _check_consistent(model, TARGET)
    assert r.exportable == (method != "flatten-noprune")
    if method == "flatten-noprune":
        assert r.params > dense_params * TARGET / 6  # wider blocks keep their weights
        return
    model.save_pretrained(tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float64).eval()
    assert plain.config.num_hidden_layers == r.layers
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, logits, atol=1e-10)


def test_compress_with_refuses_unknown_method(calib_ids):
    with pytest.raises(ValueError, match="unknown method.*sleb"):
        M.compress_with("slice", make_tiny("llama"), calib_ids, TARGET)


# ------------------------------------------------------------------------------------------- SLEB
def test_sleb_removals_equal_a_brute_force_greedy(calib_ids):
    model = make_tiny("llama")
    dense = copy.deepcopy(model)
    info = B.sleb(model, calib_ids, TARGET, progress=False)
    removed: list[int] = []
    for step in info["steps"]:
        alive = [i for i in range(6) if i not in removed]
        brute = {j: _ppl(_without(dense, removed + [j]), calib_ids) for j in alive}
        assert step["scores"] == pytest.approx(brute, rel=1e-9)
        assert step["removed"] == min(brute, key=brute.get)
        removed.append(step["removed"])
    assert info["removed"] == removed


def test_sleb_scores_on_the_given_windows_only(calib_ids):
    model = make_tiny("llama")
    dense = copy.deepcopy(model)
    info = B.sleb(model, calib_ids, 5, score_ids=calib_ids[:2, :16], progress=False)
    j = info["removed"][0]
    assert info["steps"][0]["ppl"] == pytest.approx(_ppl(_without(dense, [j]), calib_ids[:2, :16]), rel=1e-9)


# ------------------------------------------------------------------------------------------- LaCo
def test_rdsc_merge_is_base_plus_sum_of_differences():
    model = make_tiny("llama-bias")
    blocks = list(model.model.layers[1:4])
    merged = B.rdsc_merge(get_adapter(model), blocks)
    theta = [dict(b.named_parameters()) for b in blocks]
    names = [n for n, _ in merged.named_parameters()]
    assert any(n.endswith("o_proj.bias") for n in names) and any(n.endswith("down_proj.bias") for n in names)
    for name, p in merged.named_parameters():
        if name.startswith(("self_attn.", "mlp.")):
            expected = theta[0][name] + (theta[1][name] - theta[0][name]) + (theta[2][name] - theta[0][name])
        else:  # norms: the base block's
            expected = theta[0][name]
        assert torch.allclose(p, expected, atol=1e-12), name
    assert not torch.equal(merged.mlp.down_proj.weight, blocks[0].mlp.down_proj.weight)  # inputs untouched, copy changed


def test_laco_merges_top_down_with_the_rdsc_weights(calib_ids):
    model = make_tiny("llama")
    dense = copy.deepcopy(model)
    info = B.laco(model, calib_ids, TARGET, merge_layers=3, threshold=-1.0, progress=False)  # every merge passes
    # l starts at L - C = 3 and the merge takes the 3 blocks still needed: 3, 4, 5 -> one block.
    assert [m["members"] for m in info["merges"]] == [[3, 4, 5]]
    assert info["merges"][0]["accepted_by"] == "threshold"
    _check_consistent(model, TARGET)
    theta = [dict(dense.model.layers[i].named_parameters()) for i in (3, 4, 5)]
    for name, p in model.model.layers[3].named_parameters():
        diffs = sum(t[name] - theta[0][name] for t in theta[1:]) if name.startswith(("self_attn.", "mlp.")) else 0
        assert torch.allclose(p, theta[0][name] + diffs, atol=1e-12), name
    for i in range(3):
        assert torch.equal(model.model.layers[i].mlp.down_proj.weight, dense.model.layers[i].mlp.down_proj.weight)


def test_laco_falls_back_to_the_most_similar_merge(calib_ids):
    model = make_tiny("qwen2")
    info = B.laco(model, calib_ids, TARGET, merge_layers=2, threshold=1.5, progress=False)  # nothing passes T
    _check_consistent(model, TARGET)
    assert [m["accepted_by"] for m in info["merges"]] == ["fallback", "fallback"]
    cands = info["candidates"]
    sweep, first_round = cands[:4], cands[4:8]  # the sweep tries l = 4, 3, 2, 1; then every position >= low = 1
    assert [c["position"] for c in sweep] == [4, 3, 2, 1] and [c["position"] for c in first_round] == [1, 2, 3, 4]
    by_pos = {c["position"]: c["similarity"] for c in sweep}
    for c in first_round:  # same model, same inputs (cached vs carried forward): same similarity
        assert c["similarity"] == pytest.approx(by_pos[c["position"]], abs=1e-12)
    assert info["merges"][0]["members"] == max(first_round, key=lambda c: c["similarity"])["members"]


# ------------------------------------------------------------------------------------ BlockPruner
def _sub_block_reference(blocks, removed, model, ids):
    """Logits of the model that runs every kept sub-block in order: u = h + Attn(N(h)), out = u + MLP(N'(u))."""
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        pe = _pe(model, h)
        for i, b in enumerate(blocks):
            if (i, "attn") not in removed:
                h = h + b.self_attn(b.input_layernorm(h), position_embeddings=pe, attention_mask=None)[0]
            if (i, "mlp") not in removed:
                h = h + b.mlp(b.post_attention_layernorm(h))
        return model.lm_head(model.model.norm(h))


def test_a_lone_sub_block_left_is_exactly_the_identity_residual():
    model = make_tiny("llama-bias")
    blocks = list(model.model.layers)
    layers, groups, zeroed = B.pack_sub_blocks(get_adapter(model), blocks, {(2, "attn")})
    assert len(layers) == 6 and zeroed == [{"layer": 2, "block": 2, "sub": "attn"}]
    h = torch.randn(2, 16, 48, dtype=torch.float64)
    pe = _pe(model, h)
    with torch.no_grad():
        out = layers[2](h, position_embeddings=pe, attention_mask=None)
        mlp_only = h + blocks[2].mlp(blocks[2].post_attention_layernorm(h))
    assert torch.equal(out, mlp_only)  # the zeroed attention adds exactly nothing (o_proj bias zeroed too)


def test_adjacent_attention_and_mlp_of_different_blocks_pack_into_one_stock_layer(calib_ids):
    model = make_tiny("qwen2")
    blocks = list(model.model.layers)
    removed = {(1, "mlp"), (2, "attn"), (4, "attn")}
    ref = _sub_block_reference(blocks, removed, model, calib_ids[:2])
    layers, groups, zeroed = B.pack_sub_blocks(get_adapter(model), blocks, removed)
    assert groups == [[0], [1, 2], [3], [4], [5]]
    assert [(z["block"], z["sub"]) for z in zeroed] == [(4, "attn")]  # M4 follows M3: alone
    get_adapter(model).install(layers, groups)
    _check_consistent(model, 5)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=calib_ids[:2]).logits, ref, atol=1e-10)


def test_blockpruner_first_removal_equals_brute_force(calib_ids):
    model = make_tiny("llama")
    dense = copy.deepcopy(model)
    info = B.blockpruner(model, calib_ids, 5, budget="sub_blocks", progress=False)
    assert len(info["removed"]) == 2
    brute = {}
    for i in range(6):
        for sub in ("attn", "mlp"):
            m = copy.deepcopy(dense)
            B.zero_sub_block(get_adapter(m), m.model.layers[i], sub)
            brute[i, sub] = _ppl(m, calib_ids)
    assert info["steps"][0]["removed"] == list(min(brute, key=lambda k: (brute[k], k)))
    assert info["steps"][0]["ppl"] == pytest.approx(min(brute.values()), rel=1e-9)
    removed = {tuple(r) for r in info["removed"]}
    ref = _sub_block_reference(list(dense.model.layers), removed, dense, calib_ids[:2])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=calib_ids[:2]).logits, ref, atol=1e-10)


def test_blockpruner_stops_at_the_first_step_that_reaches_the_parameter_budget(calib_ids):
    model = make_tiny("llama")
    dense_params = M.count_parameters(model)
    r = M.compress_with("blockpruner", model, calib_ids, TARGET, progress=False)
    sizes = [s["params"] for s in r.info["steps"]]
    assert sum(sizes) == r.info["params_removed"] >= r.info["params_budget"] > sum(sizes[:-1])
    assert r.params_active == r.params - r.info["params_zeroed"]
    assert r.params == dense_params - r.info["params_removed"] + r.info["params_zeroed"]


# -------------------------------------------------------------------------------- flatten-noprune
def test_flatten_noprune_equals_the_parallel_form(calib_ids):
    model = make_tiny("llama-bias")
    dense = copy.deepcopy(model)
    groups = [[0], [1, 2, 3], [4, 5]]
    info = B.flatten_noprune(model, calib_ids, 3, groups=groups)
    assert info["groups"] == groups
    _check_consistent(model, 3)
    ids = calib_ids[:2]
    with torch.no_grad():
        h = dense.model.embed_tokens(ids)
        pe = _pe(dense, h)
        for g in groups:
            bs = [dense.model.layers[i] for i in g]
            u = h + sum(b.self_attn(b.input_layernorm(h), position_embeddings=pe, attention_mask=None)[0] for b in bs)
            h = u + sum(b.mlp(b.post_attention_layernorm(u)) for b in bs)
        ref = dense.lm_head(dense.model.norm(h))
        assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-9)
    assert model.model.layers[1].self_attn.q_proj.out_features == 3 * 6 * 8  # 3H heads kept


def test_flatten_noprune_chooses_pairs_like_flattengpt(calib_ids):
    model = make_tiny("mistral")
    info = B.flatten_noprune(model, calib_ids, TARGET, progress=False)
    _check_consistent(model, TARGET)
    assert info["chosen_by"] == "similarity" and len(info["steps"]) == 2
    first = info["steps"][0]
    dense = make_tiny("mistral")
    runner = B.BlockRunner(dense, "cpu")
    sims = B.io_similarities(runner, runner.embed(calib_ids), list(dense.model.layers))
    assert first["position"] == max(range(5), key=lambda k: sims[k])  # most similar adjacent inputs


def test_flatten_noprune_refuses_bad_groups(calib_ids):
    with pytest.raises(ValueError, match="disjoint runs of adjacent"):
        B.flatten_noprune(make_tiny("llama"), calib_ids, 3, groups=[[0], [2, 1], [3, 4, 5]])
    with pytest.raises(ValueError, match="not the target 3"):
        B.flatten_noprune(make_tiny("llama"), calib_ids, 3, groups=[[1, 2]])
