"""The memory model's shapes and counts agree with the code they describe.

Shapes: each named config's parameter counts equal those of the transformers model the benchmark
builds (on the meta device, so 7B widths cost nothing). Counts: the InputCache keeps exactly the
sets ``cached_sets`` predicts; the activations autograd saves in a LoRA step match
``layer_saved_bytes`` at a width it was not counted at. The offloaded device peak does not depend
on depth, the resident one does.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from transformers import AutoModelForCausalLM

from benchmarks.scale import hf_config
from flatten_lightning import memory
from flatten_lightning.calibrate import BlockRunner, InputCache
from flatten_lightning.lora import LoraSpec, add_lora


@pytest.mark.parametrize("name", list(memory.SHAPES))
def test_shapes_count_the_parameters_of_the_built_model(name):
    shapes = memory.SHAPES[name].with_layers(2)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(name, shapes, "bfloat16"))
    assert sum(p.numel() for p in model.model.layers[0].parameters()) == shapes.block_params
    assert sum(p.numel() for p in model.parameters()) == shapes.params()


def test_published_sizes():
    """The well-known totals: Llama-2-7B 6.74B, Llama-3-8B 8.03B, Mistral-7B 7.24B, Qwen1.5-7B 7.72B parameters."""
    totals = {name: round(s.params() / 1e9, 2) for name, s in memory.SHAPES.items()}
    assert totals == {"llama2-7b": 6.74, "llama3-8b": 8.03, "mistral-7b": 7.24, "qwen1.5-7b": 7.72}


@pytest.mark.parametrize(("layers", "stride"), [(8, None), (32, None), (9, 3), (5, 0), (2, None)])
def test_cached_sets_is_what_the_input_cache_keeps(layers, stride):
    model = make_tiny("llama", num_hidden_layers=layers)
    cache = InputCache(BlockRunner(model, "cpu"), torch.zeros(1, 2, 3), InputCache.auto_stride(layers) if stride is None else stride)
    for position in range(layers):
        cache.offer(position, torch.zeros(1, 2, 3))
    assert len(cache.saved) - 1 == memory.cached_sets(layers, stride)  # position 0 is the embeddings, on the device


def saved_bytes_per_token(layers: int, hidden: int, intermediate: int, kv_heads: int, tokens: int = 32) -> float:
    """Bytes of non-parameter tensors autograd saves in one bf16 LoRA forward, per token."""
    model = make_tiny(
        "llama",
        dtype=torch.bfloat16,
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=hidden // 4,
    )
    model = add_lora(model, LoraSpec(r=4)).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False)
    return sum(saved.values()) / tokens


def test_layer_saved_bytes_matches_autograd_at_an_uncounted_width():
    """Per-layer bytes (difference of 3 and 2 layers) at D=192, I=328, Kd=96: within 10% of the formula."""
    per_layer = saved_bytes_per_token(3, 192, 328, 2) - saved_bytes_per_token(2, 192, 328, 2)
    shapes = memory.Shapes(3, 192, 328, 4, 2, 97)
    assert per_layer == pytest.approx(memory.layer_saved_bytes(shapes), rel=0.10)


def test_offloaded_device_peak_is_one_pair_whatever_the_depth():
    s = memory.SHAPES["llama2-7b"]
    shallow, deep = (memory.compression_peak(s.with_layers(n), 4096, offload=True) for n in (8, 32))
    assert shallow.device == deep.device
    resident = [memory.compression_peak(s.with_layers(n), 4096).device for n in (8, 32)]
    assert resident[1] - resident[0] == pytest.approx(24 * 2 * s.block_params)


def test_fold_stats_bytes_is_what_the_cv_mlp_pass_keeps():
    """With fit_ridge="cv" the MLP's per-fold pass keeps K Grams and cross terms for the I kept channels only."""
    from flatten_lightning.compress import _mlp_pass
    from flatten_lightning.flatten import flatten_blocks

    model = make_tiny("llama")
    runner = BlockRunner(model, "cpu")
    blocks = list(runner.adapter.blocks())
    ids = torch.randint(0, model.config.vocab_size, (4, 8), generator=torch.Generator().manual_seed(0))
    h = runner.embed(ids)
    flat = flatten_blocks(runner.adapter, blocks[:2])
    kept, hidden = torch.arange(0, 2 * model.config.intermediate_size, 2), model.config.hidden_size
    stats = _mlp_pass(runner, flat, h, h, False, folds=3, keep=kept)
    assert stats[0].shape == (3, len(kept), len(kept)) and len(kept) == model.config.intermediate_size
    assert sum(t.nbytes for t in stats) == memory.fold_stats_bytes(len(kept), hidden, 3)
    assert memory.fold_stats_bytes(len(kept), hidden, 1) == 0  # one fold is the summed statistics, counted already
