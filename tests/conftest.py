"""Shared fixtures: tiny random models of every supported family, in float64 for exact checks."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Tiny-model tests are dominated by small ops: one thread avoids oversubscription on 2-core machines
# (measured 45x faster here when another job runs). The real-model test raises it again.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data")
WIKITEXT = os.path.join(DATA, "wikitext-2", "valid.txt")

_COMMON = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=40,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def make_tiny(kind: str, seed: int = 0, dtype: torch.dtype = torch.float64, **overrides):
    """A randomly initialised tiny model of ``kind`` (llama: GQA 6/2; mistral; qwen2 with q/k/v biases; phi3 fused).

    Norm weights and biases are randomised too, so norm folding and bias handling are exercised.
    """
    torch.manual_seed(seed)
    kw = {**_COMMON, **overrides}
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw, tie_word_embeddings=True))
    elif kind == "llama-bias":  # Llama with attention_bias (o_proj bias too) and mlp_bias
        model = LlamaForCausalLM(LlamaConfig(**kw, attention_bias=True, mlp_bias=True))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**kw, sliding_window=None))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw, use_sliding_window=False))
    elif kind == "phi3":  # fused qkv_proj / gate_up_proj
        model = Phi3ForCausalLM(Phi3Config(**kw, sliding_window=None, pad_token_id=0))
    else:
        raise ValueError(kind)
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.to(dtype).eval()


KINDS = ["llama", "mistral", "qwen2", "llama-bias", "phi3"]


@pytest.fixture(params=KINDS)
def tiny(request):
    return make_tiny(request.param)


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (8, 32), generator=g)


@pytest.fixture
def python_exe():
    return sys.executable


def word_tokenizer(words: list[str], size: int = 97):
    """An offline word-level fast tokenizer: [UNK] plus the first ``size - 1`` distinct ``words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(list(dict.fromkeys(words))[: size - 1])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]")


@pytest.fixture
def tiny_dir(tmp_path):
    """A tiny Llama saved as a local Hugging Face directory with a word tokenizer (a 'real' user source)."""
    model = make_tiny("llama", dtype=torch.float32)
    words = open(WIKITEXT, encoding="utf-8").read(20000).split()[:500]
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    word_tokenizer(words).save_pretrained(path)
    return path
