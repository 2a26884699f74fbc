"""The flattened block equals the parallel form of its blocks (docs/DESIGN.md 1.2), for every family."""

import torch

from flatten_lightning.adapters import get_adapter
from flatten_lightning.calibrate import BlockRunner
from flatten_lightning.flatten import flatten_blocks


def parallel_form(blocks, h, pe):
    """u = h + sum_l Attn_l(N_l(h)); out = u + sum_l MLP_l(N'_l(u)), computed block by block."""
    u = h + sum(b.self_attn(b.input_layernorm(h), position_embeddings=pe, attention_mask=None)[0] for b in blocks)
    return u + sum(b.mlp(b.post_attention_layernorm(u)) for b in blocks)


def test_flattened_block_equals_parallel_form(tiny):
    blocks = list(tiny.model.layers)
    runner = BlockRunner(tiny, "cpu")
    h = torch.randn(3, 20, tiny.config.hidden_size, dtype=torch.float64)
    pe = runner.context(h)["position_embeddings"]
    for group in (blocks[1:3], blocks[2:5]):  # a pair and a group of three
        flat = flatten_blocks(get_adapter(tiny), group)
        got = flat(h, position_embeddings=pe, attention_mask=None)
        err = (got - parallel_form(group, h, pe)).abs().max().item()
        assert err <= 1e-6, err
        # It differs from the sequential computation (the flattening error is real, not zero).
        seq = h
        for b in group:
            seq = b(seq, position_embeddings=pe, attention_mask=None)
        assert (got - seq).abs().max().item() > 1e-5  # 1e-4..1e-2 here, vs 1e-15 rounding


def test_flattened_shapes_and_inputs_untouched(tiny):
    a, b = tiny.model.layers[0], tiny.model.layers[1]
    before = {k: v.clone() for k, v in a.state_dict().items()}
    ad = get_adapter(tiny)
    flat = flatten_blocks(ad, [a, b])
    cfg = tiny.config
    w = ad.read(flat)
    assert ad.heads_of(w) == (2 * cfg.num_attention_heads, 2 * cfg.num_key_value_heads)
    assert ad.down_module(flat).in_features == 2 * cfg.intermediate_size
    assert torch.equal(w.attn_norm.scale, torch.ones_like(w.attn_norm.scale))
    assert ad.is_plain()
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_new_modules_are_trainable():
    from conftest import make_tiny

    model = make_tiny("llama")
    with torch.no_grad():
        flat = flatten_blocks(get_adapter(model), list(model.model.layers[:2]))
    assert all(p.requires_grad for p in flat.parameters())
