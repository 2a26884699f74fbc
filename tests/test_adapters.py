"""The adapter seam: every family's branches are its blocks' own computation, read/write round-trips,
and unsupported architectures are refused with the feature named."""

import pytest
import torch
from conftest import KINDS, make_tiny
from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM, Qwen3Config, Qwen3ForCausalLM

from flatten_lightning.adapters import ADAPTERS, UnsupportedArchitectureError, get_adapter
from flatten_lightning.calibrate import BlockRunner
from flatten_lightning.compress import CompressConfig, flatten_gpt

SMALL = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


@pytest.mark.parametrize(
    "model, feature",
    [
        (lambda: GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4)), "GPT-2"),
        (lambda: Qwen3ForCausalLM(Qwen3Config(**SMALL, intermediate_size=64, num_key_value_heads=2, head_dim=8)), "q_norm/k_norm"),
        (
            lambda: MixtralForCausalLM(MixtralConfig(**SMALL, intermediate_size=64, num_key_value_heads=2, num_local_experts=2)),
            "mixture-of-experts",
        ),
    ],
)
def test_refused_with_feature_named(model, feature, calib_ids):
    m = model()
    with pytest.raises(UnsupportedArchitectureError, match=feature):
        get_adapter(m)
    with pytest.raises(UnsupportedArchitectureError, match=feature):  # before any work is done
        flatten_gpt(m, calib_ids, CompressConfig(1), progress=False)


def test_non_silu_activation_refused():
    m = make_tiny("llama", hidden_act="gelu")
    with pytest.raises(UnsupportedArchitectureError, match="hidden_act 'gelu'"):
        get_adapter(m)


def test_layout_gqa():
    lay = get_adapter(make_tiny("llama")).layout()
    assert (lay.n_heads, lay.n_kv_heads, lay.head_dim, lay.n_rep) == (6, 2, 8, 3)


def test_every_tiny_family_has_an_adapter():
    assert {make_tiny(k).config.model_type for k in KINDS} <= set(ADAPTERS)


@torch.no_grad()
def test_branches_are_the_blocks_own_computation(tiny):
    """run_block(h) == u + M(u) with u = h + A(h), bit for bit: the algorithms may use either."""
    ad = get_adapter(tiny)
    runner = BlockRunner(tiny, "cpu")
    h = torch.randn(2, 12, tiny.config.hidden_size, dtype=torch.float64)
    ctx = runner.context(h)
    for block in ad.blocks()[:2]:
        u = h + ad.attention(block, h, ctx)
        assert torch.equal(ad.run_block(block, h, ctx), u + ad.mlp(block, u))


@torch.no_grad()
def test_read_write_round_trip_keeps_the_block(tiny):
    ad = get_adapter(tiny)
    runner = BlockRunner(tiny, "cpu")
    h = torch.randn(2, 12, tiny.config.hidden_size, dtype=torch.float64)
    ctx = runner.context(h)
    block = ad.blocks()[1]
    before = ad.run_block(block, h, ctx)
    ad.write(block, ad.read(block))
    assert torch.equal(ad.run_block(block, h, ctx), before)
    assert ad.is_plain()


@torch.no_grad()
def test_embed_and_context_reproduce_the_models_forward(tiny, calib_ids):
    """embed -> run_block over every block -> final_norm -> lm_head equals the stock forward's logits."""
    ad = get_adapter(tiny)
    runner = BlockRunner(tiny, "cpu")
    ids = calib_ids[:2]
    h = runner.run_blocks(list(ad.blocks()), runner.embed(ids))
    logits = ad.lm_head()(ad.final_norm()(h))
    assert torch.allclose(logits, tiny(input_ids=ids).logits, atol=1e-10)


def test_phi3_read_splits_fused_projections():
    m = make_tiny("phi3")
    ad = get_adapter(m)
    w = ad.read(ad.blocks()[0])
    cfg = m.config
    assert w.q.weight.shape[0] == cfg.num_attention_heads * cfg.head_dim
    assert w.k.weight.shape[0] == w.v.weight.shape[0] == cfg.num_key_value_heads * cfg.head_dim
    assert w.gate.weight.shape[0] == w.up.weight.shape[0] == cfg.intermediate_size
    assert ad.lora_targets == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
