"""Unsupported architectures are refused with the feature named."""

import pytest
from conftest import make_tiny
from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM, Qwen3Config, Qwen3ForCausalLM

from flatten_lightning.arch import UnsupportedArchitectureError, check_supported, head_layout
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
        check_supported(m)
    with pytest.raises(UnsupportedArchitectureError, match=feature):  # before any work is done
        flatten_gpt(m, calib_ids, CompressConfig(1), progress=False)


def test_non_silu_activation_refused():
    m = make_tiny("llama", hidden_act="gelu")
    with pytest.raises(UnsupportedArchitectureError, match="hidden_act 'gelu'"):
        check_supported(m)


def test_head_layout_gqa():
    lay = head_layout(make_tiny("llama"))
    assert (lay.n_heads, lay.n_kv_heads, lay.head_dim, lay.n_rep) == (6, 2, 8, 3)
